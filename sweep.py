"""Run a grid of experiments, one process per run, and summarise it over seeds.

    python sweep.py main_federated.py --sweep=cnn_pathological --seed=1 --seed=2 --seed=3 \\
        --algorithm=quped --algorithm=local --algorithm=fedavg_ft --rounds=100 --baseline=local

Every hyperparameter given more than once is an axis of the grid; one given once applies to
every run. A value may carry settings of its own after '@': --algorithm=qupel@lambda_p=1.0
runs qupel with lambda_p 1.0 and the other algorithms with the single --lambda_p given (each
method with the hyperparameters chosen for it). Each run is `python SCRIPT
--results_dir=<results_dir>/<sweep> --run_name=<its axis values> ...`, its output in
logs/<run name>.log. Running the same command again skips the finished runs and resumes killed
ones (`--resume`), so a sweep can be stopped at any moment; a folder whose runs were made with
other settings is refused (sweep.json records each run's arguments, config.json its resolved
configuration). Then it writes, into the sweep's folder, summary.json and summary.md: per
setting (the axis values but the seed), the mean and standard deviation over seeds of the test
accuracy at the round chosen on validation and at the last round (weighted by test images, and
the mean over clients), and each setting's paired difference from the setting with
`--compare=<axis>` equal to a `--baseline`, its other values the same. Seeds are the unit: one
difference per seed (of the mean over the seed's clients, and of the image-weighted accuracy),
and a t interval over those, seeds - 1 degrees of freedom (`paired`); where the clients mix
architectures (client_archs), the same per personalised architecture too. Where the runs have a
global model, the teacher's too: its validation accuracy over each client's own classes at the
selected round (mean over clients, and per architecture), the students' validation accuracy
minus it (a t interval over seeds), and its paired difference from the baseline's teacher (not
carried by --combine). For a search, it names the
setting of highest validation accuracy (at each run's selected round, mean over seeds) per value
of the compared axis, or among all settings without one, and how many it was chosen from.
`python plot.py --sweep=<folder>` draws it.

    python sweep.py --pair='Results/other/seed=*' \\
        --to='Results/cnn_pathological/seed=*,algorithm=local'

pairs the runs of two sweeps (or of two settings) by their seed, the same way, and with
--out=FILE.json keeps the result.

    python sweep.py --combine=Results/a/summary.json --combine=Results/b/summary.json \
        --out=Results/a_and_b.json

takes the summaries of sweeps of one design run on different seeds (another machine, seeds
added later) together: each seed's difference from a baseline taken within its own sweep, one
t interval over the seeds of all (--baseline=VALUE[,VALUE...] in place of the summaries' own
baselines; a comparison a summary lacks is left out and named), printed and, with --out, kept
with a markdown table of the same name (.md).

Options of the sweep itself: --sweep=NAME (its folder under results_dir; default: the script's
name and the date), --compare=NAME (default: algorithm when it is an axis),
--baseline=VALUE[,VALUE...], --jobs=N runs at a time (default 1), --threads=N torch threads per
run (default: the CPUs divided among the jobs).
"""
if __name__ == '__main__':  # first, so that a Ctrl-C while torch loads ends quietly too
    import startup  # noqa: F401
import concurrent.futures
import datetime
import glob
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading

import scipy.stats

import federated
import runs
import runtime

ROOT = os.path.dirname(os.path.abspath(__file__))
OPTIONS = ('sweep', 'compare', 'baseline', 'jobs', 'threads')
LEVEL = 0.95  # the paired intervals' coverage
RECORD = 'sweep.json'  # the script and every run's arguments, as the sweep gave them


class SweepError(Exception):
    """A sweep that cannot run or be summarised; the message says what to change."""


# --- the grid --------------------------------------------------------------------------------

def parse_args(argv):
    """(script, {option: value}, {name: [values as written]}) from the command line."""
    if not argv or argv[0].startswith('--'):
        raise SweepError("name the experiment script first: python sweep.py main_federated.py "
                         "--seed=1 --seed=2 ...")
    script, options, grid = argv[0], {}, {}
    if not os.path.isfile(script):
        raise SweepError(f"{script} does not exist: name main_federated.py or "
                         f"main_centralized.py.")
    for arg in argv[1:]:
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            raise SweepError(f"cannot read argument {arg!r}: write --name=value.")
        if name in OPTIONS:
            options[name] = text
        else:
            grid.setdefault(name, []).append(text)
    return script, options, grid


def positive_option(options, name, default):
    """An option that counts something (--jobs, --threads): a whole number of 1 or more."""
    text = options.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SweepError(f"--{name}={text} is not a whole number of 1 or more: give e.g. "
                         f"--{name}=2.")
    return value


def runs_of(grid):
    """[{name: value text}] for every combination of the grid's values, in the order given;
    a value's own settings ('@name=value') join its runs."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def split_value(text):
    """(value, {name: value}) of a grid value with its own settings: 'qupel@lambda_p=1.0'."""
    value, *extras = text.split('@')
    settings = {}
    for extra in extras:
        name, eq, setting = extra.partition('=')
        if not eq:
            raise SweepError(f"cannot read {extra!r} in {text!r}: write value@name=value.")
        settings[name] = setting
    return value, settings


def arguments(run):
    """The run's --name=value arguments; a value's own settings win over single values."""
    out, own = {}, {}
    for name, text in run.items():
        out[name], settings = split_value(text)
        own.update(settings)
    return {**out, **own}


def axes_of(grid):
    return [name for name, values in grid.items() if len(values) > 1]


def run_name(run, axes):
    return ','.join(f'{name}={split_value(run[name])[0]}' for name in axes) or 'run'


# --- the runs' folders -------------------------------------------------------------------------

def same_value(saved, text):
    """Whether the argument `text` asks for the value a run's config.json holds."""
    default = tuple(saved) if isinstance(saved, list) else saved
    try:
        return runtime.parse_value({'value': default}, 'value', text) == default
    except runtime.ConfigError:
        return False


def changed_settings(folder, asked, recorded):
    """The settings of the run in `folder` that differ from the arguments `asked`: against its
    config.json, and against the arguments the sweep gave it before (`recorded`, or None)."""
    cfg = runs.read_config(folder)
    changes = [f"{name} ({cfg.get(name, 'absent')!r} in its config.json, {text} now)"
               for name, text in asked.items() if name not in cfg or
               not same_value(cfg[name], text)]
    for name, text in (recorded or {}).items():
        if name not in asked and name not in ('results_dir', 'run_name'):
            changes.append(f"{name} (given as {text} before, not now)")
    return changes


def check_same_settings(sweep_dir, planned, axes, results_dir):
    """A sweep folder's existing runs must have been made with the arguments asked now, so that
    a rerun never passes old numbers off as new."""
    recorded = {}
    if os.path.isfile(os.path.join(sweep_dir, RECORD)):
        try:
            recorded = runs.read_json(os.path.join(sweep_dir, RECORD))['runs']
        except (runs.RunError, KeyError, TypeError) as e:
            raise SweepError(f"{os.path.join(sweep_dir, RECORD)} cannot be read ({e}): restore "
                             f"it or start a new --sweep name.") from None
    problems = []
    for run in planned:
        name = run_name(run, axes)
        folder = os.path.join(sweep_dir, name)
        if os.path.isfile(os.path.join(folder, 'config.json')):
            try:
                changes = changed_settings(folder, arguments(run), recorded.get(name))
            except runs.RunError as e:
                raise SweepError(f"{e}: the run {folder} cannot be checked against this sweep's "
                                 f"settings; move that folder away to run it anew.") from None
            if changes:
                problems.append(f"{name}: {', '.join(changes)}")
    if problems:
        free = next(f"{os.path.basename(sweep_dir)}-{i}" for i in itertools.count(2)
                    if not os.path.exists(os.path.join(results_dir,
                                                       f"{os.path.basename(sweep_dir)}-{i}")))
        raise SweepError(f"{sweep_dir} holds runs made with other settings than these, and a "
                         f"sweep never reports them as this one's: {'; '.join(problems)}. Give "
                         f"this grid a new name, e.g. --sweep={free}, or the settings those runs "
                         f"were made with.")


def record_runs(sweep_dir, script, planned, axes):
    """sweep.json: the script and each run's arguments (earlier runs of the folder kept)."""
    path = os.path.join(sweep_dir, RECORD)
    record = runs.read_json(path) if os.path.isfile(path) else {'runs': {}}
    record.update(kind='sweep', script=os.path.basename(script))
    record['runs'].update({run_name(run, axes): arguments(run) for run in planned})
    runs.write_json(path, record)


def command(script, folder, run, sweep_dir):
    if runs.status(folder) == 'killed':
        return [sys.executable, script, f'--resume={folder}']
    return [sys.executable, script, f'--results_dir={sweep_dir}',
            f'--run_name={os.path.basename(folder)}',
            *(f'--{k}={v}' for k, v in arguments(run).items())]


# --- running -----------------------------------------------------------------------------------

def log_path(folder):
    logs = os.path.join(os.path.dirname(folder), 'logs')
    os.makedirs(logs, exist_ok=True)
    return os.path.join(logs, f'{os.path.basename(folder)}.log')


def say(line):
    """One line on stdout in a single write, so that the lines of runs starting and ending in
    other threads never run together."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()


class Children:
    """The runs' processes while they run, each in a session of its own so that only the sweep
    signals them: Ctrl-C or SIGTERM to the sweep stops every one (each keeps its last completed
    round), and a run whose sweep is killed outright stops itself (runtime.SWEEP_PIPE_ENV)."""

    def __init__(self, env):
        self.env, self.active, self.stopping = env, {}, False
        self.lock = threading.Lock()

    def run(self, folder, cmd):
        """Run one, its output appended to its log; its exit status (None: not started)."""
        with self.lock:
            if self.stopping:
                return None
            say(f"start {os.path.basename(folder)}")
            reading, writing = os.pipe()  # the run stops once `writing` closes: with this process
            env = {**self.env, runtime.SWEEP_PIPE_ENV: str(reading)}
            with open(log_path(folder), 'a') as log:
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           pass_fds=(reading,), cwd=ROOT, start_new_session=True)
            os.close(reading)
            self.active[folder] = process
        code = process.wait()
        os.close(writing)
        with self.lock:
            del self.active[folder]
        return code

    def stop(self, signum):
        with self.lock:
            self.stopping = True
            processes = list(self.active.values())
        for process in processes:
            process.send_signal(signum)
        for process in processes:
            process.wait()


def run_all(script, planned, axes, sweep_dir, jobs, threads):
    """Run every run that is not finished, `jobs` at a time; each one's output goes to
    logs/<run name>.log in the sweep's folder. Returns the folders that failed."""
    pending = []
    for run in planned:
        folder = os.path.join(sweep_dir, run_name(run, axes))
        try:
            state = runs.status(folder)
        except runs.RunError as e:
            print(f"{os.path.basename(folder)}: damaged ({e}); left out, not run")
            continue
        print(f"{os.path.basename(folder)}: {state}")
        if state != 'finished':
            pending.append((folder, command(script, folder, run, sweep_dir)))
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    children = Children(env)
    failed = []
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {executor.submit(children.run, folder, cmd): folder for folder, cmd in pending}
        for future in concurrent.futures.as_completed(futures):
            folder, code = futures[future], future.result()
            state = 'finished' if code == 0 else (
                f'failed (exit status {code}, see {log_path(folder)})')
            say(f"{os.path.basename(folder)}: {state}")
            if code != 0:
                failed.append(folder)
    except KeyboardInterrupt as e:
        children.stop(signal.SIGTERM if isinstance(e, runtime.Terminated) else signal.SIGINT)
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return failed


# --- statistics --------------------------------------------------------------------------------

def mean_and_interval(values, level=LEVEL):
    """{'mean', 'std', 'n', 'low', 'high', 'half_width'}: a t interval (n - 1 degrees of
    freedom) for the mean of `values`, taken as independent draws; no interval (None) for fewer
    than two."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {'mean': mean, 'std': None, 'n': n, 'low': None, 'high': None,
                'half_width': None}
    std = statistics.stdev(values)
    half = scipy.stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {'mean': mean, 'std': std, 'n': n, 'low': mean - half, 'high': mean + half,
            'half_width': half}


def over_seeds(values):
    return {'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else None, 'values': values}


# --- summary -----------------------------------------------------------------------------------

def accuracy_keys(row):
    """(validation, test) keys of a centralized row: the quantized model's, or the
    full-precision one's in an fp run, which has no quantized model."""
    return ('q_val_acc', 'q_test_acc') if 'q_test_acc' in row else ('val_acc', 'test_acc')


def run_results(folder):
    """A finished run's test accuracies at the round (epoch) chosen on validation and at the
    last: weighted, mean over clients, and per client ({client id: [accuracy, test images]}; a
    centralized run is one client), with the (weighted) validation accuracy of that round, each
    client's teacher (teacher_of), and where the clients mix architectures each one's ('archs',
    personalised_archs). Without
    validation images nothing is chosen: 'selected' is None. Raises runs.RunError for
    rows it cannot read."""
    cfg, rows = runs.read_config(folder), runs.read_rows(folder)
    try:
        if runs.kind_of(cfg) != 'centralized':
            selected = max(rows, key=lambda row: row['q_val_acc_weighted'])

            def accuracies(row):
                return {'weighted': row['q_test_acc_weighted'], 'mean': row['q_test_acc_mean'],
                        'validation': row['q_val_acc_weighted'],
                        'round': row['round'], 'clients': {
                            str(c['client']): [c['q_test_acc'], c['n_test']]
                            for c in row['clients']}, 'teacher': teacher_of(cfg, row)}
        else:
            val, test = accuracy_keys(rows[0])
            selected = (max(rows, key=lambda row: row[val]) if cfg.get('val_fraction')
                        else None)

            def accuracies(row):
                return {'weighted': row[test], 'mean': row[test], 'validation': row.get(val),
                        'round': row['epoch'], 'clients': {'0': [row[test], None]},
                        'teacher': None}
        return {'selected': None if selected is None else accuracies(selected),
                'last': accuracies(rows[-1]), 'code': cfg.get('code'),
                'archs': personalised_archs(cfg, rows[-1])}
    except (KeyError, TypeError, IndexError) as e:
        raise runs.RunError(f"{os.path.join(folder, 'metrics.jsonl')} lacks {e} in a row") from None


def teacher_of(cfg, row):
    """{client id: [the global model's validation accuracy over the client's own classes, the
    validation accuracy of the client's own model (its student), or None where the clients
    have no model of their own beside the global one]} of a federated row. None where the run
    has no global model (local training) or its rows predate the teacher's scores."""
    algorithm = federated.ALGORITHMS.get(cfg.get('algorithm'))
    students = algorithm is not None and algorithm.personalised and algorithm.global_model
    teachers = {str(c['client']): [c.get('global_val_acc_own'),
                                   c['q_val_acc'] if students else None]
                for c in row['clients']}
    return None if any(t is None for t, _ in teachers.values()) else teachers


def client_means(values, archs):
    """{'all': the mean of {client id: value}, and where the clients mix architectures (archs)
    one per architecture, over its clients}."""
    means = {'all': statistics.fmean(values.values())}
    for arch in dict.fromkeys((archs or {}).values()):
        means[arch] = statistics.fmean(v for c, v in values.items() if archs[c] == arch)
    return means


def teacher_means(result, when):
    """The teacher at `when` (client_means of the global model's own-class validation accuracy,
    'teacher', and of each student's validation accuracy minus it, 'student_minus_teacher', None
    without students), or None for a run without one."""
    teachers = result[when] and result[when].get('teacher')
    if not teachers:
        return None
    students = all(s is not None for _, s in teachers.values())
    return {'teacher': client_means({c: t for c, (t, _) in teachers.items()}, result['archs']),
            'student_minus_teacher': client_means(
                {c: s - t for c, (t, s) in teachers.items()}, result['archs'])
            if students else None}


def personalised_archs(cfg, row):
    """{client id: the architecture of its personalised model} of a federated run whose
    clients mix architectures (client_archs; the same for a baseline that evaluates another
    model, as FedAvg-FT's global one), else None."""
    if len(set(cfg.get('client_archs', ()))) < 2:  # a centralized run has none
        return None
    return {str(c['client']): federated.client_plan(cfg, c['client'])[0]
            for c in row['clients']}


def arch_means(result, when):
    """{architecture: the mean over its clients of their accuracies at `when`} of a run whose
    clients mix architectures, else None."""
    if not result.get('archs') or not result[when]:
        return None
    groups = {}
    for client, arch in result['archs'].items():
        groups.setdefault(arch, []).append(result[when]['clients'][client][0])
    return {arch: statistics.fmean(accuracies) for arch, accuracies in groups.items()}


def arch_differences(result, baseline_result, when):
    """{architecture: the difference of the means over its clients} of two runs of one seed
    whose clients mix architectures alike (the mean of their per-client differences), else
    None."""
    if not result.get('archs') or result['archs'] != baseline_result.get('archs'):
        return None
    ours, theirs = arch_means(result, when), arch_means(baseline_result, when)
    return {arch: ours[arch] - theirs[arch] for arch in ours}


def paired(results, baseline_results, when, names):
    """The paired difference from the baseline at `when` ('selected' or 'last'), seeds as the
    unit: per seed both settings ran, the difference of the mean over the seed's clients and of
    the image-weighted accuracy, and a t interval over seeds for each; where every seed's two
    runs mix the same architectures, also per personalised architecture ('by_arch', of the mean
    over its clients). The two runs of a seed must hold the same clients (ids and test images);
    `names[seed]` names the two runs."""
    seeds, means, weighted, per_arch, teachers = [], [], [], [], []
    for seed, result in results.items():
        if seed not in baseline_results or not result[when] or not baseline_results[seed][when]:
            continue
        ours, theirs = result[when], baseline_results[seed][when]
        mismatch = {c: v[1] for c, v in ours['clients'].items()} != {
            c: v[1] for c, v in theirs['clients'].items()}
        if mismatch:
            raise SweepError(f"the runs {' and '.join(names[seed])} do not hold the same clients "
                             f"(ids or test images differ), so they cannot be paired: compare "
                             f"runs of the same partition (n_clients, partition and seed).")
        seeds.append(seed)
        means.append(statistics.fmean(ours['clients'][c][0] - theirs['clients'][c][0]
                                      for c in ours['clients']))
        weighted.append(ours['weighted'] - theirs['weighted'])
        per_arch.append(arch_differences(result, baseline_results[seed], when))
        teachers.append((teacher_means(result, when), teacher_means(baseline_results[seed], when)))
    if not seeds:
        return None
    pairs = {'unit': 'seed', 'seeds': seeds, 'differences_mean': means,
             'differences_weighted': weighted, 'mean': mean_and_interval(means),
             'weighted': mean_and_interval(weighted)}
    if None not in per_arch:
        pairs['by_arch'] = {}
        for arch in per_arch[0]:
            differences = [d[arch] for d in per_arch]
            pairs['by_arch'][arch] = {'seeds': seeds, 'differences_mean': differences,
                                      'mean': mean_and_interval(differences)}
    if all(ours and theirs and ours['teacher'].keys() == theirs['teacher'].keys()
           for ours, theirs in teachers):  # each seed's teachers, over the same client groups
        pairs['teacher'] = {group: seed_intervals(seeds, [
            ours['teacher'][group] - theirs['teacher'][group] for ours, theirs in teachers])
            for group in teachers[0][0]['teacher']}
    return pairs


def seed_intervals(seeds, differences):
    return {'seeds': seeds, 'differences_mean': differences,
            'mean': mean_and_interval(differences)}


def summarise(sweep_dir, planned, axes, compare, baselines):
    """summary.json's contents: one entry per setting (the axis values but the seed), with its
    paired differences from each of `baselines` (values of the compared axis); runs that cannot
    be read are listed as left out, with the reason, and every commit the runs ran."""
    settings, folders, left_out = {}, {}, []
    for run in planned:
        folder = os.path.join(sweep_dir, run_name(run, axes))
        try:
            if runs.status(folder) != 'finished':
                continue
            result = run_results(folder)
        except runs.RunError as e:
            left_out.append({'run': os.path.basename(folder), 'reason': str(e)})
            continue
        key = tuple((name, split_value(run[name])[0]) for name in axes if name != 'seed')
        seed = split_value(run.get('seed', ''))[0]  # named without its own settings
        settings.setdefault(key, {})[seed] = result
        folders.setdefault(key, {})[seed] = os.path.basename(folder)
    entries = []
    for key, results in settings.items():
        entry = {'setting': dict(key), 'seeds': list(results)}
        validation = [r['selected']['validation'] for r in results.values() if r['selected']]
        entry['selected_validation'] = over_seeds(validation) if validation else None
        for when in ('selected', 'last'):
            for stat in ('weighted', 'mean'):
                values = [r[when][stat] for r in results.values() if r[when]]
                entry[f'{when}_{stat}'] = over_seeds(values) if values else None
        by_arch = [arch_means(r, 'selected') for r in results.values()]
        if None not in by_arch:
            entry['selected_mean_by_arch'] = {arch: over_seeds([m[arch] for m in by_arch])
                                              for arch in by_arch[0]}
        teachers = [teacher_means(r, 'selected') for r in results.values()]
        if teachers and None not in teachers:
            entry['selected_teacher'] = {group: over_seeds([t['teacher'][group] for t in teachers])
                                         for group in teachers[0]['teacher']}
            if all(t['student_minus_teacher'] for t in teachers):
                entry['selected_student_minus_teacher'] = {
                    group: seed_intervals(entry['seeds'], [t['student_minus_teacher'][group]
                                                           for t in teachers])
                    for group in teachers[0]['teacher']}
        entry['vs'] = {}
        for baseline in baselines:
            if dict(key).get(compare) == baseline:
                continue
            other = tuple((name, baseline if name == compare else value) for name, value in key)
            match = settings.get(other)
            names = {seed: (folders[key][seed], folders.get(other, {}).get(seed))
                     for seed in results}
            entry['vs'][baseline] = None if match is None else {
                when: paired(results, match, when, names) for when in ('selected', 'last')}
        entries.append(entry)
    return {'axes': axes, 'compare': compare, 'baselines': baselines, 'unit': 'seed',
            'level': LEVEL, 'settings': entries, 'left_out': left_out,
            'chosen_on_validation': chosen_on_validation(entries, compare),
            'code': code_versions(r for results in settings.values() for r in results.values())}


def code_versions(results):
    """Every distinct code version (commit, clean) the runs' results ran, sorted; None for a
    run that recorded none."""
    versions = {json.dumps(version, sort_keys=True) for result in results
                for version in (result['code'] or [None])}
    return [json.loads(v) for v in sorted(versions)]


def chosen_on_validation(entries, compare):
    """What a search chooses: per value of the compared axis (or over every setting, without
    one), the setting with the highest mean over seeds of the validation accuracy at its
    selected round, and how many settings it was chosen from (the value's tuning budget). Of
    settings tied at the highest, the first in the grid's order is chosen and the others are
    named."""
    groups = {}
    for entry in entries:
        if entry['selected_validation'] is not None:
            groups.setdefault(entry['setting'].get(compare), []).append(entry)
    chosen = []
    for value, group in groups.items():
        best = max(group, key=lambda e: e['selected_validation']['mean'])
        top = best['selected_validation']['mean']
        chosen.append({'group': value, 'tried': len(group), 'setting': best['setting'],
                       'validation': top, 'tied_with': [
                           e['setting'] for e in group if e is not best
                           and e['selected_validation']['mean'] == top]})
    return chosen


def percent(stats):
    if stats is None:
        return '-'
    spread = '' if stats['std'] is None else f" ± {100 * stats['std']:.1f}"
    return f"{100 * stats['mean']:.1f}{spread}"


def difference(stats):
    """'+1.2 [-0.3, +2.7] ±1.5' in points: mean, interval, half-width."""
    if stats is None:
        return '-'
    if stats['low'] is None:
        return f"{100 * stats['mean']:+.1f} (1 seed: no interval)"
    return (f"{100 * stats['mean']:+.1f} [{100 * stats['low']:+.1f}, {100 * stats['high']:+.1f}]"
            f" ±{100 * stats['half_width']:.1f}")


def per_seed(versus):
    if versus is None:
        return '-'
    return ', '.join(f"{seed}: {100 * d:+.1f}"
                     for seed, d in zip(versus['seeds'], versus['differences_mean']))


def summary_markdown(summary):
    """A markdown table of summary.json: accuracies in percent, mean ± std over seeds; paired
    differences in points with their interval over seeds."""
    axes = [a for a in summary['axes'] if a != 'seed']
    header = [*axes, 'seeds', 'validation acc at the selected round (weighted)',
              'test acc at val-selected round (weighted)', '(mean over clients)',
              'last round (weighted)', '(mean over clients)']
    for baseline in summary['baselines']:
        header += [f"vs {baseline}: selected round, mean over clients [95 % CI] ±half",
                   'per seed', 'image-weighted [95 % CI]', 'last round [95 % CI]']
    lines = [f"Paired differences in points: seeds are the unit (one difference per seed, of the "
             f"mean over its clients or of the image-weighted accuracy; t interval, "
             f"{100 * summary['level']:.0f} %, seeds - 1 degrees of freedom).", '',
             '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for entry in summary['settings']:
        cells = [entry['setting'][a] for a in axes] + [', '.join(entry['seeds'])]
        cells += [percent(entry[k]) for k in ('selected_validation', 'selected_weighted',
                                              'selected_mean', 'last_weighted', 'last_mean')]
        for baseline in summary['baselines']:
            versus = entry['vs'].get(baseline)
            if entry['setting'].get(summary['compare']) == baseline:
                cells += ['(baseline)', '', '', '']
            else:
                selected, last = (versus or {}).get('selected'), (versus or {}).get('last')
                cells += [difference(selected and selected['mean']), per_seed(selected),
                          difference(selected and selected['weighted']),
                          difference(last and last['mean'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += arch_markdown(summary, axes)
    lines += teacher_markdown(summary, axes)
    for chosen in summary['chosen_on_validation']:
        among = '' if chosen['group'] is None else f" among the {chosen['group']} settings"
        setting = ', '.join(f'{k}={v}' for k, v in chosen['setting'].items()) or 'the one run'
        ties = ''.join(f"; tied with {', '.join(f'{k}={v}' for k, v in tie.items())}"
                       for tie in chosen['tied_with'])
        lines.append(f"\nChosen on validation{among}: {setting} "
                     f"({100 * chosen['validation']:.1f} %, of {chosen['tried']} tried{ties}).")
    for item in summary['left_out']:
        lines.append(f"\nLeft out: {item['run']}: {item['reason']}.")
    commits = ', '.join(f"{c['commit'][:12]}{'' if c['clean'] else ' (uncommitted changes)'}"
                        if c and c.get('commit') else 'unrecorded' for c in summary['code'])
    lines.append(f"\nCode: {commits or 'no run'}.")
    return '\n'.join(lines) + '\n'


def versus_cells(summary, entry, part, group):
    """Each baseline's two cells (interval, per seed) of the entry's paired differences at the
    selected round for one group of `part` ('by_arch' or 'teacher') of the pairs."""
    cells = []
    for baseline in summary['baselines']:
        if entry['setting'].get(summary['compare']) == baseline:
            cells += ['(baseline)', '']
            continue
        versus = ((entry['vs'].get(baseline) or {}).get('selected') or {}).get(
            part, {}).get(group)
        cells += [difference(versus and versus['mean']), per_seed(versus)]
    return cells


def table_lines(title, header, rows):
    """A titled markdown table, or no line without rows."""
    if not rows:
        return []
    return ['', title, '', '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header),
            *('| ' + ' | '.join(cells) + ' |' for cells in rows)]


def arch_markdown(summary, axes):
    """Lines of a table per personalised architecture, for the settings whose clients mix
    them: the test accuracy at the selected round (mean over the architecture's clients) and
    the paired differences from each baseline."""
    header = [*axes, 'architecture', 'test acc at val-selected round (mean over its clients)']
    for baseline in summary['baselines']:
        header += [f"vs {baseline} [95 % CI] ±half", 'per seed']
    rows = [[entry['setting'][a] for a in axes] + [arch, percent(stats)]
            + versus_cells(summary, entry, 'by_arch', arch)
            for entry in summary['settings']
            for arch, stats in (entry.get('selected_mean_by_arch') or {}).items()]
    return table_lines("Per personalised architecture (each client's own, whatever model a "
                       "baseline evaluates; seeds are the unit):", header, rows)


def teacher_markdown(summary, axes):
    """Lines of a table of the settings' teachers: the global model's validation accuracy over
    each client's own classes at the run's selected round (mean over the clients, and over each
    architecture's), its students' validation accuracy minus it, and the paired differences of
    the teacher from each baseline's."""
    header = [*axes, 'clients', "teacher's own-class val acc (mean over clients)",
              'students - teacher [95 % CI] ±half', 'per seed']
    for baseline in summary['baselines']:
        header += [f"teacher vs {baseline}'s [95 % CI] ±half", 'per seed']
    rows = []
    for entry in summary['settings']:
        for group, stats in (entry.get('selected_teacher') or {}).items():
            gap = (entry.get('selected_student_minus_teacher') or {}).get(group)
            rows.append([entry['setting'][a] for a in axes]
                        + [group, percent(stats), difference(gap and gap['mean']), per_seed(gap)]
                        + versus_cells(summary, entry, 'teacher', group))
    return table_lines("The teacher (the global model) on each client's own classes, validation "
                       "images at each run's selected round (seeds are the unit):", header, rows)


def write_summary(sweep_dir, planned, axes, compare, baselines):
    summary = summarise(sweep_dir, planned, axes, compare, baselines)
    runs.write_json(os.path.join(sweep_dir, 'summary.json'), summary)
    table = summary_markdown(summary)
    runs.write_atomic(os.path.join(sweep_dir, 'summary.md'), table.encode())
    return table, summary


def check_options(options, grid, axes):
    """(compare, baselines) from the options, checked against the grid."""
    compare = options.get('compare', 'algorithm' if 'algorithm' in axes else None)
    if compare is not None and compare not in axes:
        raise SweepError(f"--compare={compare} is not an axis of the grid (the names given "
                         f"more than once: {', '.join(axes) or 'none'}).")
    baselines = [b for b in options.get('baseline', '').split(',') if b]
    if baselines and compare is None:
        raise SweepError(f"--baseline={options['baseline']} needs an axis to compare along: give "
                         f"--compare=NAME, the name of a hyperparameter given more than once "
                         f"({', '.join(axes) or 'the grid has none yet'}).")
    values = [split_value(v)[0] for v in grid.get(compare, [])]
    wrong = [b for b in baselines if b not in values]
    if wrong:
        raise SweepError(f"--baseline={','.join(wrong)} is not a value of the compared axis "
                         f"{compare}: give one of {', '.join(values)}.")
    return compare, baselines


def sweep_folder(options, grid, script):
    """results_dir/<sweep name>, the name checked to stay inside results_dir."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    name = options.get('sweep') or f"sweep_{os.path.splitext(os.path.basename(script))[0]}_" \
                                    f"{stamp}"
    results_dir = grid.pop('results_dir', ['Results'])[0]
    try:
        runtime.check_run_name(results_dir, name)
    except runtime.ConfigError as e:
        raise SweepError(str(e).replace('--run_name', '--sweep')) from None
    return results_dir, os.path.join(results_dir, name)


def sweep(argv):
    script, options, grid = parse_args(argv)
    if not grid:
        raise SweepError("give the grid's hyperparameters, e.g. --seed=1 --seed=2.")
    results_dir, sweep_dir = sweep_folder(options, grid, script)
    axes = axes_of(grid)
    compare, baselines = check_options(options, grid, axes)
    jobs = positive_option(options, 'jobs', 1)
    threads = positive_option(options, 'threads', max(1, (os.cpu_count() or 1) // jobs))
    planned = runs_of(grid)
    try:
        os.makedirs(sweep_dir, exist_ok=True)
    except OSError as e:
        raise SweepError(f"cannot create the sweep folder {sweep_dir} ({e.strerror}): choose a "
                         f"writable --results_dir.") from None
    with runs.locked(sweep_dir, 'sweep.lock', 'running the sweep in'):
        check_same_settings(sweep_dir, planned, axes, results_dir)
        record_runs(sweep_dir, script, planned, axes)
        failed = run_all(os.path.abspath(script), planned, axes, sweep_dir, jobs, threads)
        table, summary = write_summary(sweep_dir, planned, axes, compare, baselines)
    print(table)
    print(f"summary: {os.path.join(sweep_dir, 'summary.md')} and summary.json")
    if failed:
        raise SweepError(f"{len(failed)} runs failed: {', '.join(failed)}; read their logs "
                         f"in {os.path.join(sweep_dir, 'logs')}, fix the cause and run the "
                         f"same command again.")
    if summary['left_out']:
        raise SweepError(f"the summary leaves out {len(summary['left_out'])} runs it cannot "
                         f"read: " + '; '.join(f"{i['run']} ({i['reason']})"
                                               for i in summary['left_out']) +
                         ". Restore those files, or move the runs' folders away and run the "
                         "same command again to run them anew.")


# --- pairing runs of different sweeps ------------------------------------------------------

PAIR_OPTIONS = ('pair', 'to', 'out')


def runs_by_seed(pattern):
    """{seed: folder} of the finished runs whose folders match the glob `pattern`, and the
    matching folders left out as not finished; one run a seed."""
    by_seed, unfinished = {}, []
    for folder in sorted(glob.glob(pattern)):
        if not os.path.isfile(os.path.join(folder, 'config.json')):
            continue
        if runs.status(folder) != 'finished':
            unfinished.append(folder)
            continue
        seed = str(runs.read_config(folder).get('seed'))
        if seed in by_seed:
            raise SweepError(f"{by_seed[seed]} and {folder} both match {pattern!r} and are runs "
                             f"of seed {seed}: narrow the pattern to one run a seed.")
        by_seed[seed] = folder
    if not by_seed:
        raise SweepError(f"no finished run's folder matches {pattern!r}: give a glob pattern of "
                         f"run folders, e.g. 'Results/my_sweep/seed=*,algorithm=local'.")
    return by_seed, unfinished


def pair_runs(ours_pattern, theirs_pattern):
    """The paired difference (`paired`, seeds as the unit) of the runs matching `ours_pattern`
    from those matching `theirs_pattern`, matched by their configurations' seed: runs of two
    sweeps, or of one setting against another sweep's."""
    ours, ours_unfinished = runs_by_seed(ours_pattern)
    theirs, theirs_unfinished = runs_by_seed(theirs_pattern)
    seeds = sorted(set(ours) & set(theirs), key=seed_order)
    if not seeds:
        raise SweepError(f"no seed has a finished run on both sides (seeds {', '.join(ours)} "
                         f"against {', '.join(theirs)}): the patterns must match runs of the "
                         f"same seeds.")
    names = {seed: (ours[seed], theirs[seed]) for seed in seeds}
    mine = {seed: run_results(ours[seed]) for seed in seeds}
    other = {seed: run_results(theirs[seed]) for seed in seeds}
    return {'ours': ours_pattern, 'theirs': theirs_pattern, 'unit': 'seed', 'level': LEVEL,
            'runs': {seed: list(names[seed]) for seed in seeds},
            'unpaired': sorted(set(ours) ^ set(theirs), key=seed_order),
            'not_finished': ours_unfinished + theirs_unfinished,
            'selected': paired(mine, other, 'selected', names),
            'last': paired(mine, other, 'last', names),
            'code': code_versions([*mine.values(), *other.values()])}


def seed_order(seed):
    """Seeds as numbers sort ('2' before '10'), for seeds written as whole numbers."""
    return len(seed), seed


def pair_markdown(pair):
    lines = [f"{pair['ours']} - {pair['theirs']}: paired differences in points, seeds as the "
             f"unit (t interval, {100 * pair['level']:.0f} %, seeds - 1 degrees of freedom).", '',
             '| round | seeds | mean over clients [95 % CI] ±half | per seed | '
             'image-weighted [95 % CI] |', '| --- | --- | --- | --- | --- |']
    for when, label in (('selected', 'chosen on validation'), ('last', 'last')):
        versus = pair[when]
        if versus is None:
            lines.append(f"| {label} | - | - | - | - |")
            continue
        lines.append(f"| {label} | {', '.join(versus['seeds'])} | {difference(versus['mean'])} "
                     f"| {per_seed(versus)} | {difference(versus['weighted'])} |")
        for arch, by_arch in versus.get('by_arch', {}).items():
            lines.append(f"| {label}, {arch} clients | {', '.join(versus['seeds'])} | "
                         f"{difference(by_arch['mean'])} | "
                         f"{per_seed(by_arch)} | - |")
        for group, teacher in versus.get('teacher', {}).items():
            lines.append(f"| {label}, teacher's own-class validation accuracy, {group} clients | "
                         f"{', '.join(versus['seeds'])} | {difference(teacher['mean'])} | "
                         f"{per_seed(teacher)} | - |")
    if pair['unpaired']:
        lines.append(f"\nSeeds on one side only (left out): {', '.join(pair['unpaired'])}.")
    if pair['not_finished']:
        lines.append(f"\nNot finished (left out): {', '.join(pair['not_finished'])}.")
    return '\n'.join(lines) + '\n'


def pair(argv):
    """python sweep.py --pair=PATTERN --to=PATTERN [--out=FILE.json]"""
    options = {}
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or name not in PAIR_OPTIONS or name in options:
            raise SweepError(f"cannot read {arg!r}: pair runs with --pair=PATTERN --to=PATTERN "
                             f"and, to keep the result, --out=FILE.json, each once.")
        options[name] = text
    if 'to' not in options:
        raise SweepError("--pair needs --to=PATTERN, the runs to subtract.")
    try:
        result = pair_runs(options['pair'], options['to'])
    except runs.RunError as e:
        raise SweepError(f"{e}; the pairs were not computed.") from None
    print(pair_markdown(result))
    if 'out' in options:
        runs.write_json(options['out'], result)
        print(f"pairs: {options['out']}")


# --- combining the seeds of several sweeps ---------------------------------------------------

COMBINE_OPTIONS = ('combine', 'baseline', 'out')


def seed_values(seeds, stats):
    """{seed: value} of a summary's per-seed accuracies (an over_seeds dict, its values in the
    order of the entry's `seeds`), empty where a seed has none."""
    if not stats or len(stats['values']) != len(seeds):
        return {}
    return dict(zip(seeds, stats['values']))


def seed_difference(entry, baseline, ours, theirs):
    """{seed: entry's value - baseline's} of two entries' per-seed accuracies (`ours` of entry,
    `theirs` of baseline), for the seeds both have."""
    mine, other = seed_values(entry['seeds'], ours), seed_values(baseline['seeds'], theirs)
    return {seed: v - other[seed] for seed, v in mine.items() if seed in other}


def seed_differences(entry, baseline, when):
    """{'mean': {seed: difference}, 'weighted': ..., 'by_arch': {arch: {seed: difference}} or
    None} of a summary's setting from its baseline's entry at `when`: each seed's difference of
    the means over its clients (the mean of the per-client differences, as `paired` takes it,
    the clients being the same), for the seeds both ran; per architecture at the selected round
    only, the one the summaries keep."""
    differences = {stat: seed_difference(entry, baseline, entry.get(f'{when}_{stat}'),
                                         baseline.get(f'{when}_{stat}'))
                   for stat in ('mean', 'weighted')}
    ours, theirs = (e.get('selected_mean_by_arch') for e in (entry, baseline))
    differences['by_arch'] = None
    if when == 'selected' and ours and theirs and set(ours) == set(theirs):
        differences['by_arch'] = {arch: seed_difference(entry, baseline, ours[arch], theirs[arch])
                                  for arch in ours}
    return differences


def setting_label(setting, compare):
    """'quped' for a setting of the compared axis only, else its axis values."""
    if list(setting) == [compare]:
        return setting[compare]
    return ','.join(f'{name}={value}' for name, value in setting.items())


def summary_comparisons(summary, baselines=None):
    """{'<setting> - <baseline>': {when: seed_differences}} of a sweep's summary.json, from its
    own baselines or from `baselines` (values of its compared axis)."""
    compare = summary['compare']
    entries = {tuple(sorted(e['setting'].items())): e for e in summary['settings']}
    comparisons = {}
    for entry in summary['settings']:
        for baseline in baselines or summary['baselines']:
            other = entries.get(tuple(sorted({**entry['setting'], compare: baseline}.items())))
            if entry['setting'].get(compare) == baseline or other is None:
                continue
            comparisons[f"{setting_label(entry['setting'], compare)} - {baseline}"] = {
                when: seed_differences(entry, other, when) for when in ('selected', 'last')}
    return comparisons


def joined(parts):
    """One comparison over the seeds of every part (seed_differences of disjoint seeds), in
    `paired`'s form; None where a part has no seed."""
    if not all(part['mean'] for part in parts):
        return None
    means = {seed: d for part in parts for seed, d in part['mean'].items()}
    weighted = {seed: d for part in parts for seed, d in part['weighted'].items()}
    seeds = list(means)
    versus = {'unit': 'seed', 'seeds': seeds,
              'differences_mean': [means[s] for s in seeds],
              'differences_weighted': [weighted[s] for s in seeds],
              'mean': mean_and_interval([means[s] for s in seeds]),
              'weighted': mean_and_interval([weighted[s] for s in seeds])}
    archs = [part['by_arch'] for part in parts]
    if None not in archs and all(set(a) == set(archs[0]) for a in archs):
        versus['by_arch'] = {}
        for arch in archs[0]:
            by_seed = {seed: d for a in archs for seed, d in a[arch].items()}
            values = [by_seed[s] for s in seeds]
            versus['by_arch'][arch] = {'seeds': seeds, 'differences_mean': values,
                                       'mean': mean_and_interval(values)}
    return versus


def read_summary(path):
    try:
        with open(path) as f:
            summary = json.load(f)
        return summary, {seed for entry in summary['settings'] for seed in entry['seeds']}
    except OSError as e:
        raise SweepError(f"cannot read {path} ({e.strerror}): give the path of a sweep's "
                         f"summary.json.") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SweepError(f"{path} is not a sweep's summary.json ({e!r}): give the "
                         f"summary.json files sweep.py wrote.") from None


def combine_summaries(paths, baselines=None):
    """The paired comparisons of several sweeps of one design but different seeds, over all
    their seeds: each seed's difference taken within its own sweep (so no pair mixes two
    sweeps' runs), a t interval over the seeds of all; from each summary's own baselines, or
    from `baselines`. Comparisons missing from a summary are left out, with the reason; a seed
    in two summaries is an error."""
    summaries, owner = [], {}
    for path in paths:
        summary, seeds = read_summary(path)
        for seed in sorted(seeds, key=seed_order):
            if seed in owner:
                raise SweepError(f"seed {seed} is in both {owner[seed]} and {path}: combine the "
                                 f"summaries of sweeps of different seeds.")
            owner[seed] = path
        summaries.append((path, summary, sorted(seeds, key=seed_order)))
    found = [summary_comparisons(summary, baselines) for _, summary, _ in summaries]
    comparisons, left_out = {}, []
    for name in dict.fromkeys(name for comparison in found for name in comparison):
        missing = [path for path, comparison in zip(paths, found) if name not in comparison]
        if missing:
            left_out.append({'comparison': name, 'reason': f"not in {', '.join(missing)}"})
            continue
        comparisons[name] = {when: joined([c[name][when] for c in found])
                             for when in ('selected', 'last')}
    return {'unit': 'seed', 'level': LEVEL, 'baselines': baselines,
            'sources': [{'summary': path, 'seeds': seeds, 'code': summary.get('code')}
                        for path, summary, seeds in summaries],
            'comparisons': comparisons, 'left_out': left_out}


def combine_markdown(combined):
    lines = [f"Paired differences in points over the seeds of {len(combined['sources'])} "
             f"sweeps, each seed's taken within its own sweep; seeds are the unit (t interval, "
             f"{100 * combined['level']:.0f} %, seeds - 1 degrees of freedom).", '',
             '| comparison | round | seeds | mean over clients [95 % CI] ±half | per seed | '
             'image-weighted [95 % CI] |', '| --- | --- | --- | --- | --- | --- |']
    for name, comparison in combined['comparisons'].items():
        for when, label in (('selected', 'chosen on validation'), ('last', 'last')):
            versus = comparison[when]
            if versus is None:
                lines.append(f"| {name} | {label} | - | - | - | - |")
                continue
            seeds = ', '.join(versus['seeds'])
            lines.append(f"| {name} | {label} | {seeds} | {difference(versus['mean'])} | "
                         f"{per_seed(versus)} | {difference(versus['weighted'])} |")
            for arch, by_arch in versus.get('by_arch', {}).items():
                lines.append(f"| {name}, {arch} clients | {label} | {seeds} | "
                             f"{difference(by_arch['mean'])} | {per_seed(by_arch)} | - |")
    for item in combined['left_out']:
        lines.append(f"\nLeft out: {item['comparison']}: {item['reason']}.")
    for source in combined['sources']:
        commits = ', '.join(c['commit'][:12] for c in source['code'] or () if c and
                            c.get('commit')) or 'unrecorded'
        lines.append(f"\nSeeds {', '.join(source['seeds'])}: {source['summary']} "
                     f"(code {commits}).")
    return '\n'.join(lines) + '\n'


def combine(argv):
    """python sweep.py --combine=SUMMARY.json --combine=SUMMARY.json ...
    [--baseline=VALUE[,VALUE...]] [--out=FILE.json]"""
    paths, options = [], {}
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or name not in COMBINE_OPTIONS or \
                name in options:
            raise SweepError(f"cannot read {arg!r}: combine sweeps with --combine=SUMMARY.json "
                             f"given once per sweep, optionally --baseline=VALUE[,VALUE...] "
                             f"and, to keep the result, --out=FILE.json, each once.")
        if name == 'combine':
            paths.append(text)
        else:
            options[name] = text
    if len(paths) < 2:
        raise SweepError("--combine needs two summaries or more: give --combine=SUMMARY.json "
                         "once per sweep.")
    baselines = [b for b in options.get('baseline', '').split(',') if b] or None
    result = combine_summaries(paths, baselines)
    print(combine_markdown(result))
    if 'out' in options:
        table = os.path.splitext(options['out'])[0] + '.md'
        runs.write_json(options['out'], result)
        runs.write_atomic(table, combine_markdown(result).encode())
        print(f"combined: {options['out']} and {table}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    runtime.handle_stop_signals()
    try:
        if any(arg.startswith('--pair=') for arg in argv):
            pair(argv)
            return
        if any(arg.startswith('--combine=') for arg in argv):
            combine(argv)
            return
        sweep(argv)
    except (SweepError, runtime.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as e:
        print("stopped: every run keeps its last completed round; run the same command again to "
              "continue the sweep.", file=sys.stderr)
        raise SystemExit(runtime.exit_status(e))


if __name__ == '__main__':
    main()
