"""Run a grid of experiments, one process per run, and summarise it over seeds.

    python sweep.py main_federated.py --sweep=cnn_pathological --seed=1 --seed=2 --seed=3 \\
        --algorithm=quped --algorithm=local --algorithm=fedavg_ft --rounds=100 --baseline=local

Every hyperparameter given more than once is an axis of the grid; one given once applies to
every run. A value may carry settings of its own after '@': --algorithm=qupel@lambda_p=1.0
runs qupel with lambda_p 1.0 and the other algorithms with the single --lambda_p given (each
method with the hyperparameters chosen for it). Each run is `python SCRIPT
--results_dir=<results_dir>/<sweep> --run_name=<its axis values> ...`, its output in
logs/<run name>.log. Running the same command again skips the finished runs and resumes killed
ones (`--resume`), so a sweep can be stopped at any moment. Then it writes, into the sweep's
folder, summary.json and summary.md: per setting (the axis values but the seed), the mean and
standard deviation over seeds of the test accuracy at the round chosen on validation and at the
last round (weighted by test images, and the mean over clients), and each setting's paired
difference from the setting with `--compare=<axis>` equal to a `--baseline`, its other values
the same, with a 95 % interval over seeds and clients (summarise). `python plot.py
--sweep=<folder>` draws it.

Options of the sweep itself: --sweep=NAME (its folder under results_dir; default: the script's
name and the date), --compare=NAME (default: algorithm when it is an axis),
--baseline=VALUE[,VALUE...], --jobs=N runs at a time (default 1), --threads=N torch threads per
run (default: the CPUs divided among the jobs).
"""
import datetime
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import runtime

ROOT = os.path.dirname(os.path.abspath(__file__))
OPTIONS = ('sweep', 'compare', 'baseline', 'jobs', 'threads')


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


def total_of(cfg):
    """The rounds or epochs a run's configuration asks for."""
    if 'rounds' in cfg:
        return cfg['rounds']
    return cfg['fp_epochs'] if cfg.get('fp') else cfg['EPOCHS']


def read_rows(folder):
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_config(folder):
    with open(os.path.join(folder, 'config.json')) as f:
        return json.load(f)


def status(folder):
    """'new', 'finished' or 'killed' (a folder the script has written config.json into)."""
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        return 'new'
    return 'finished' if len(read_rows(folder)) >= total_of(read_config(folder)) else 'killed'


def command(script, folder, run, sweep_dir):
    if status(folder) == 'killed':
        return [sys.executable, script, f'--resume={folder}']
    return [sys.executable, script, f'--results_dir={sweep_dir}',
            f'--run_name={os.path.basename(folder)}',
            *(f'--{k}={v}' for k, v in arguments(run).items())]


# --- running -----------------------------------------------------------------------------------

def log_path(folder):
    logs = os.path.join(os.path.dirname(folder), 'logs')
    os.makedirs(logs, exist_ok=True)
    return os.path.join(logs, f'{os.path.basename(folder)}.log')


def run_all(script, runs, axes, sweep_dir, jobs, threads):
    """Run every run that is not finished, `jobs` at a time; each one's output goes to
    logs/<run name>.log in the sweep's folder. Ctrl-C stops them (each keeps its last completed
    round)."""
    pending = []
    for run in runs:
        folder = os.path.join(sweep_dir, run_name(run, axes))
        state = status(folder)
        print(f"{os.path.basename(folder)}: {state}")
        if state != 'finished':
            pending.append((folder, command(script, folder, run, sweep_dir)))
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    active, failed = [], []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                folder, cmd = pending.pop(0)
                log = open(log_path(folder), 'a')
                print(f"start {os.path.basename(folder)}", flush=True)
                active.append((folder, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                        env=env, cwd=ROOT), log))
            time.sleep(0.2)
            for item in list(active):
                folder, process, log = item
                if process.poll() is not None:
                    log.close()
                    active.remove(item)
                    state = 'finished' if process.returncode == 0 else (
                        f'failed (exit status {process.returncode}, see {log_path(folder)})')
                    print(f"{os.path.basename(folder)}: {state}", flush=True)
                    if process.returncode != 0:
                        failed.append(folder)
    except KeyboardInterrupt:
        for _, process, _ in active:
            process.send_signal(signal.SIGINT)
        for _, process, log in active:
            process.wait()
            log.close()
        raise
    return failed


# --- statistics --------------------------------------------------------------------------------

def incomplete_beta(a, b, x):
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method, as in Numerical Recipes)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 0.0
    f = None
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + numerator * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + numerator / c
        c = c if abs(c) > tiny else tiny
        f = (c * d) if f is None else f * c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


def student_t_cdf(t, df):
    x = df / (df + t * t)
    tail = 0.5 * incomplete_beta(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def student_t_quantile(p, df):
    """The p-quantile of Student's t with `df` degrees of freedom, by bisection."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_and_interval(values, level=0.95):
    """{'mean', 'std', 'n', 'low', 'high'}: a t interval for the mean of `values`, taken as
    independent (None bounds for fewer than two)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {'mean': mean, 'std': None, 'n': n, 'low': None, 'high': None}
    std = statistics.stdev(values)
    half = student_t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {'mean': mean, 'std': std, 'n': n, 'low': mean - half, 'high': mean + half}


def over_seeds(values):
    return {'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else None, 'values': values}


# --- summary -----------------------------------------------------------------------------------

def run_results(folder):
    """A finished run's test accuracies at the round (epoch) chosen on validation and at the
    last: weighted, mean over clients, and per client (a centralized run is one client).
    Without validation images nothing is chosen: 'selected' is None."""
    cfg, rows = read_config(folder), read_rows(folder)
    if 'rounds' in cfg:
        selected = max(rows, key=lambda row: row['q_val_acc_weighted'])

        def accuracies(row):
            return {'weighted': row['q_test_acc_weighted'], 'mean': row['q_test_acc_mean'],
                    'round': row['round'], 'clients': [c['q_test_acc'] for c in row['clients']]}
    else:
        selected = (max(rows, key=lambda row: row['q_val_acc']) if cfg.get('val_fraction')
                    else None)

        def accuracies(row):
            return {'weighted': row['q_test_acc'], 'mean': row['q_test_acc'],
                    'round': row['epoch'], 'clients': [row['q_test_acc']]}
    return {'selected': None if selected is None else accuracies(selected),
            'last': accuracies(rows[-1])}


def paired(results, baseline_results, when):
    """The per-client differences from the baseline at `when` ('selected' or 'last'), pooled
    over the seeds both settings ran."""
    differences = []
    for seed, result in results.items():
        if seed in baseline_results and result[when] and baseline_results[seed][when]:
            ours, theirs = result[when]['clients'], baseline_results[seed][when]['clients']
            differences += [a - b for a, b in zip(ours, theirs)]
    return mean_and_interval(differences) if differences else None


def summarise(sweep_dir, runs, axes, compare, baselines):
    """summary.json's contents: one entry per setting (the axis values but the seed), with its
    paired differences from each of `baselines` (values of the compared axis)."""
    settings = {}
    for run in runs:
        folder = os.path.join(sweep_dir, run_name(run, axes))
        if status(folder) != 'finished':
            continue
        key = tuple((name, split_value(run[name])[0]) for name in axes if name != 'seed')
        settings.setdefault(key, {})[run.get('seed', '')] = run_results(folder)
    entries = []
    for key, results in settings.items():
        entry = {'setting': dict(key), 'seeds': list(results)}
        for when in ('selected', 'last'):
            for stat in ('weighted', 'mean'):
                values = [r[when][stat] for r in results.values() if r[when]]
                entry[f'{when}_{stat}'] = over_seeds(values) if values else None
        entry['vs'] = {}
        for baseline in baselines:
            if dict(key).get(compare) == baseline:
                continue
            other = dict(key, **{compare: baseline})
            match = settings.get(tuple((name, other[name]) for name, _ in key))
            entry['vs'][baseline] = None if match is None else {
                when: paired(results, match, when) for when in ('selected', 'last')}
        entries.append(entry)
    return {'axes': axes, 'compare': compare, 'baselines': baselines, 'settings': entries}


def percent(stats):
    if stats is None:
        return '-'
    spread = '' if stats['std'] is None else f" ± {100 * stats['std']:.1f}"
    return f"{100 * stats['mean']:.1f}{spread}"


def difference(stats):
    if stats is None:
        return '-'
    if stats['low'] is None:
        return f"{100 * stats['mean']:+.1f}"
    return f"{100 * stats['mean']:+.1f} [{100 * stats['low']:+.1f}, {100 * stats['high']:+.1f}]"


def summary_markdown(summary):
    """A markdown table of summary.json: accuracies in percent, mean ± std over seeds."""
    axes = [a for a in summary['axes'] if a != 'seed']
    header = [*axes, 'seeds', 'test acc at val-selected round (weighted)', '(mean over clients)',
              'last round (weighted)', '(mean over clients)']
    for baseline in summary['baselines']:
        header += [f"vs {baseline}: selected round [95 % CI]", 'last round [95 % CI]']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for entry in summary['settings']:
        cells = [entry['setting'][a] for a in axes] + [str(len(entry['seeds']))]
        cells += [percent(entry[k]) for k in ('selected_weighted', 'selected_mean',
                                              'last_weighted', 'last_mean')]
        for baseline in summary['baselines']:
            versus = entry['vs'].get(baseline)
            if entry['setting'].get(summary['compare']) == baseline:
                cells += ['(baseline)', '']
            else:
                cells += [difference(versus and versus['selected']),
                          difference(versus and versus['last'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_summary(sweep_dir, runs, axes, compare, baselines):
    summary = summarise(sweep_dir, runs, axes, compare, baselines)
    runtime.write_json(os.path.join(sweep_dir, 'summary.json'), summary)
    table = summary_markdown(summary)
    runtime.write_atomic(os.path.join(sweep_dir, 'summary.md'), table.encode())
    return table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        script, options, grid = parse_args(argv)
        if not grid:
            raise SweepError("give the grid's hyperparameters, e.g. --seed=1 --seed=2.")
        axes = axes_of(grid)
        compare = options.get('compare', 'algorithm' if 'algorithm' in axes else None)
        if compare is not None and compare not in axes:
            raise SweepError(f"--compare={compare} is not an axis of the grid (the names given "
                             f"more than once: {', '.join(axes) or 'none'}).")
        baselines = [b for b in options.get('baseline', '').split(',') if b]
        values = [split_value(v)[0] for v in grid.get(compare, [])]
        wrong = [b for b in baselines if compare is None or b not in values]
        if wrong:
            raise SweepError(f"--baseline={','.join(wrong)} is not a value of the compared axis "
                             f"{compare}: give one of {', '.join(values)}.")
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        name = options.get('sweep') or f"sweep_{os.path.splitext(os.path.basename(script))[0]}_" \
                                        f"{stamp}"
        results_dir = grid.get('results_dir', ['Results'])[0]
        grid.pop('results_dir', None)
        sweep_dir = os.path.join(results_dir, name)
        jobs = int(options.get('jobs', 1))
        threads = int(options.get('threads', max(1, (os.cpu_count() or 1) // jobs)))
        os.makedirs(sweep_dir, exist_ok=True)
        runs = runs_of(grid)
        failed = run_all(os.path.abspath(script), runs, axes, sweep_dir, jobs, threads)
        print(write_summary(sweep_dir, runs, axes, compare, baselines))
        print(f"summary: {os.path.join(sweep_dir, 'summary.md')} and summary.json")
        if failed:
            raise SweepError(f"{len(failed)} runs failed: {', '.join(failed)}; read their logs "
                             f"in {os.path.join(sweep_dir, 'logs')}, fix the cause and run the "
                             f"same command again.")
    except (SweepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue the sweep.", file=sys.stderr)
        raise SystemExit(runtime.INTERRUPTED)


if __name__ == '__main__':
    main()
