"""sweep.py: the grid, skipping finished runs and resuming killed ones, and the summary's
statistics against hand-computed ones."""
import json
import math
import os
import statistics

import pytest
import torch

import main_federated as mf
import sweep
from conftest import ROOT, Killed, exits_with_error, kill_after_round


@pytest.mark.parametrize('df, quantile', [(1, 12.7062), (2, 4.3027), (5, 2.5706),
                                          (10, 2.2281), (30, 2.0423), (1000, 1.9623)])
def test_student_t_quantiles_match_the_table(df, quantile):
    assert sweep.student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)


def test_repeated_names_are_axes_and_single_ones_apply_to_every_run():
    script, options, grid = sweep.parse_args([
        str(ROOT / 'main_federated.py'), '--seed=1', '--seed=2', '--algorithm=quped',
        '--algorithm=local', '--rounds=5', '--baseline=local', '--jobs=2'])
    assert options == {'baseline': 'local', 'jobs': '2'}
    assert sweep.axes_of(grid) == ['seed', 'algorithm']
    runs = sweep.runs_of(grid)
    assert runs == [{'seed': s, 'algorithm': a, 'rounds': '5'}
                    for s in ('1', '2') for a in ('quped', 'local')]
    assert sweep.run_name(runs[1], ['seed', 'algorithm']) == 'seed=1,algorithm=local'


# --- the summary on a fixture --------------------------------------------------------------------

ACCURACIES = {  # (algorithm, seed): per round, per client (val, test)
    ('quped', 1): [[(0.5, 0.6), (0.7, 0.8)], [(0.6, 0.7), (0.8, 0.5)]],
    ('quped', 2): [[(0.9, 0.9), (0.9, 0.7)], [(0.1, 0.2), (0.2, 0.3)]],
    ('quped', 3): [[(0.3, 0.4), (0.3, 0.6)], [(0.4, 0.5), (0.6, 0.6)]],
    ('local', 1): [[(0.4, 0.5), (0.6, 0.6)], [(0.3, 0.3), (0.3, 0.4)]],
    ('local', 2): [[(0.2, 0.3), (0.2, 0.2)], [(0.5, 0.6), (0.5, 0.5)]],
    ('local', 3): [[(0.3, 0.3), (0.4, 0.5)], [(0.4, 0.4), (0.4, 0.4)]],
}
N_VAL, N_TEST = (1, 3), (2, 2)  # per client


def fixture_row(rnd, clients):
    entries = [{'client': i, 'q_val_acc': v, 'q_test_acc': t, 'n_val': N_VAL[i],
                'n_test': N_TEST[i]} for i, (v, t) in enumerate(clients)]
    row = {'round': rnd, 'clients': entries}
    for split, sizes in (('val', N_VAL), ('test', N_TEST)):
        accs = [c[f'q_{split}_acc'] for c in entries]
        row[f'q_{split}_acc_weighted'] = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
        row[f'q_{split}_acc_mean'] = statistics.fmean(accs)
    return row


def write_fixture(sweep_dir):
    for (algorithm, seed), rounds in ACCURACIES.items():
        folder = sweep_dir / f'seed={seed},algorithm={algorithm}'
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps({'rounds': 2}))
        (folder / 'metrics.jsonl').write_text(''.join(
            json.dumps(fixture_row(r + 1, clients)) + '\n' for r, clients in enumerate(rounds)))


def test_summary_statistics_equal_hand_computed_ones(tmp_path):
    write_fixture(tmp_path)
    runs = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', ['local'])
    quped = next(e for e in summary['settings'] if e['setting'] == {'algorithm': 'quped'})
    # selected rounds on weighted validation accuracy (1 x v0 + 3 x v1) / 4:
    # quped seed 1: round 1 0.65 vs round 2 0.75 -> round 2; seed 2: 0.9 vs 0.175 -> round 1;
    # seed 3: 0.3 vs 0.55 -> round 2
    selected_tests = [(0.7, 0.5), (0.9, 0.7), (0.5, 0.6)]
    weighted = [(a + b) / 2 for a, b in selected_tests]  # two test images each
    assert quped['selected_weighted']['mean'] == pytest.approx(statistics.fmean(weighted))
    assert quped['selected_weighted']['std'] == pytest.approx(statistics.stdev(weighted))
    last = [(0.7, 0.5), (0.2, 0.3), (0.5, 0.6)]
    assert quped['last_mean']['values'] == pytest.approx([(a + b) / 2 for a, b in last])
    # local's selected rounds: seed 1: 0.55 vs 0.3 -> 1; seed 2: 0.2 vs 0.5 -> 2;
    # seed 3: 0.375 vs 0.4 -> 2
    local_tests = [(0.5, 0.6), (0.6, 0.5), (0.4, 0.4)]
    differences = [a - b for ours, theirs in zip(selected_tests, local_tests)
                   for a, b in zip(ours, theirs)]
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    half = 2.5706 * sd / math.sqrt(6)  # t(0.975, 5 degrees of freedom)
    got = quped['vs']['local']['selected']
    assert got['n'] == 6 and got['mean'] == pytest.approx(mean)
    assert got['low'] == pytest.approx(mean - half, abs=1e-4)
    assert got['high'] == pytest.approx(mean + half, abs=1e-4)
    table = sweep.summary_markdown(summary)
    assert f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]" in table
    assert '| local | 3 |' in table and '(baseline)' in table


# --- running ---------------------------------------------------------------------------------

def tiny(cifar_root):
    return [f'--data_root={cifar_root}', '--n_clients=2', '--classes_per_client=5',
            '--rounds=2', '--BATCH_SIZE=20', '--client_archs=(cifarnet,)',
            '--global_arch=cifarnet', '--algorithm=fedavg']


def test_a_sweep_resumes_a_killed_run_and_skips_a_finished_one(cifar_root, tmp_path,
                                                               monkeypatch, capsys):
    sweep_dir = tmp_path / 'results' / 's'
    killed_args = [*tiny(cifar_root), '--seed=2', f'--results_dir={sweep_dir}',
                   '--run_name=seed=2']
    with monkeypatch.context() as patch:
        kill_after_round(patch, 1)
        with pytest.raises(Killed):
            mf.main(killed_args)
    whole = mf.main([*tiny(cifar_root), '--seed=2', f'--results_dir={tmp_path}',
                     '--run_name=whole'])
    # the runs' sums follow the thread count (README, Faithfulness): the sweep's runs use ours
    argv = [str(ROOT / 'main_federated.py'), '--sweep=s', f'--results_dir={tmp_path}/results',
            f'--threads={torch.get_num_threads()}', '--seed=1', '--seed=2', *tiny(cifar_root)]
    sweep.main(argv)
    out = capsys.readouterr().out
    assert 'seed=1: new' in out and 'seed=2: killed' in out
    without = [{k: v for k, v in row.items() if not k.endswith('seconds')}
               for row in sweep.read_rows(sweep_dir / 'seed=2')]
    assert without == [{k: v for k, v in row.items() if not k.endswith('seconds')}
                       for row in sweep.read_rows(whole)]
    finished = (sweep_dir / 'seed=1' / 'metrics.jsonl').stat().st_mtime_ns
    sweep.main(argv)
    out = capsys.readouterr().out
    assert 'seed=1: finished' in out and 'seed=2: finished' in out and 'start' not in out
    assert (sweep_dir / 'seed=1' / 'metrics.jsonl').stat().st_mtime_ns == finished
    summary = json.loads((sweep_dir / 'summary.json').read_text())
    assert summary['settings'][0]['seeds'] == ['1', '2']
    assert os.path.isfile(sweep_dir / 'summary.md')


@pytest.mark.parametrize('argv, phrase', [
    ([], 'name the experiment script first'),
    (['nonexistent.py', '--seed=1'], 'does not exist'),
    ([str(ROOT / 'main_federated.py'), '--seed=1', '--seed=2', '--compare=algorithm'],
     'not an axis'),
    ([str(ROOT / 'main_federated.py'), '--algorithm=quped', '--algorithm=local',
      '--baseline=fedavg'], 'not a value of the compared axis'),
])
def test_bad_sweeps(capsys, argv, phrase):
    exits_with_error(capsys, sweep.main, argv, phrase)


def test_a_value_may_carry_settings_of_its_own():
    _, _, grid = sweep.parse_args([str(ROOT / 'main_federated.py'), '--algorithm=quped',
                                   '--algorithm=qupel@lambda_p=1.0@lambda_coef=(1e-05,)',
                                   '--lambda_p=0.1'])
    runs = sweep.runs_of(grid)
    assert [sweep.arguments(run) for run in runs] == [
        {'algorithm': 'quped', 'lambda_p': '0.1'},
        {'algorithm': 'qupel', 'lambda_p': '1.0', 'lambda_coef': '(1e-05,)'}]
    assert sweep.run_name(runs[1], ['algorithm']) == 'algorithm=qupel'


def test_plot_draws_a_sweep_with_its_standard_deviations_as_error_bars(tmp_path):
    import plot
    from matplotlib.container import BarContainer
    write_fixture(tmp_path)
    runs = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', ['local'])
    ax = plot.sweep_figure(summary, 'fixture').axes[0]
    assert ax.get_title().startswith('fixture: mean over 3 seeds')
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    for container, key in zip(bars, ('selected_weighted', 'last_weighted')):
        stats = [e[key] for e in summary['settings']]
        assert [b.get_height() for b in container] == pytest.approx([s['mean'] for s in stats])
        segments = container.errorbar.lines[2][0].get_segments()  # one vertical bar each
        assert [top[1] - bottom[1] for bottom, top in segments] == pytest.approx(
            [2 * s['std'] for s in stats])
    sweep.write_summary(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', ['local'])
    assert os.path.isfile(plot.plot_sweep(str(tmp_path)))
