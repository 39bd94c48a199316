"""sweep.py: the grid, skipping finished runs and resuming killed ones, and the summary's
statistics against hand-computed ones."""
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

import main_federated as mf
import runs
import runtime
import sweep
from conftest import Killed, ROOT, exits_with_error, kill_after_round


@pytest.mark.parametrize('df, quantile', [(1, 12.7062), (2, 4.3027), (5, 2.5706),
                                          (10, 2.2281), (30, 2.0423)])
def test_interval_half_widths_use_the_t_table(df, quantile):
    values = [0.1 * i * i for i in range(df + 1)]
    got = sweep.mean_and_interval(values)
    assert got['n'] == df + 1
    assert got['half_width'] == pytest.approx(
        quantile * statistics.stdev(values) / math.sqrt(df + 1), rel=1e-4)
    assert got['low'] == pytest.approx(statistics.fmean(values) - got['half_width'])


def test_one_value_gives_no_interval():
    assert sweep.mean_and_interval([0.3]) == {'mean': 0.3, 'std': None, 'n': 1, 'low': None,
                                              'high': None, 'half_width': None}


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
N_VAL, N_TEST = (1, 3), (1, 3)  # per client


def fixture_row(rnd, clients):
    entries = [{'client': i, 'q_val_acc': v, 'q_test_acc': t, 'n_val': N_VAL[i],
                'n_test': N_TEST[i]} for i, (v, t) in enumerate(clients)]
    row = {'round': rnd, 'clients': entries}
    for split, sizes in (('val', N_VAL), ('test', N_TEST)):
        accs = [c[f'q_{split}_acc'] for c in entries]
        row[f'q_{split}_acc_weighted'] = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
        row[f'q_{split}_acc_mean'] = statistics.fmean(accs)
    return row


def write_fixture(sweep_dir, accuracies=ACCURACIES):
    for (algorithm, seed), rounds in accuracies.items():
        folder = sweep_dir / f'seed={seed},algorithm={algorithm}'
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(
            {'rounds': 2, 'seed': seed, 'algorithm': algorithm, 'lambda_p': 0.1,
             'code': [{'commit': 'a' * 40, 'clean': True}]}))
        (folder / 'metrics.jsonl').write_text(''.join(
            json.dumps(fixture_row(r + 1, clients)) + '\n' for r, clients in enumerate(rounds)))


def weighted(tests):
    return (tests[0] * N_TEST[0] + tests[1] * N_TEST[1]) / sum(N_TEST)


def test_summary_statistics_equal_hand_computed_ones(tmp_path):
    write_fixture(tmp_path)
    runs = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', ['local'])
    quped = next(e for e in summary['settings'] if e['setting'] == {'algorithm': 'quped'})
    # selected rounds on weighted validation accuracy (1 x v0 + 3 x v1) / 4:
    # quped seed 1: round 1 0.65 vs round 2 0.75 -> round 2; seed 2: 0.9 vs 0.175 -> round 1;
    # seed 3: 0.3 vs 0.55 -> round 2
    selected_tests = [(0.7, 0.5), (0.9, 0.7), (0.5, 0.6)]
    assert quped['selected_weighted']['mean'] == pytest.approx(
        statistics.fmean(map(weighted, selected_tests)))
    assert quped['selected_weighted']['std'] == pytest.approx(
        statistics.stdev(map(weighted, selected_tests)))
    last = [(0.7, 0.5), (0.2, 0.3), (0.5, 0.6)]
    assert quped['last_mean']['values'] == pytest.approx([(a + b) / 2 for a, b in last])
    # local's selected rounds: seed 1: 0.55 vs 0.3 -> 1; seed 2: 0.2 vs 0.5 -> 2;
    # seed 3: 0.375 vs 0.4 -> 2
    local_tests = [(0.5, 0.6), (0.6, 0.5), (0.4, 0.4)]
    # one difference per seed: +0.05, +0.25, +0.15 (mean over the two clients)
    per_seed = [((a0 - b0) + (a1 - b1)) / 2
                for (a0, a1), (b0, b1) in zip(selected_tests, local_tests)]
    assert per_seed == pytest.approx([0.05, 0.25, 0.15])
    half = 4.3027 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) x sd 0.1 / sqrt(3)
    got = quped['vs']['local']['selected']
    assert got['unit'] == 'seed' and got['seeds'] == ['1', '2', '3']
    assert got['differences_mean'] == pytest.approx(per_seed)
    assert got['mean']['n'] == 3 and got['mean']['mean'] == pytest.approx(0.15)
    assert got['mean']['half_width'] == pytest.approx(half, abs=1e-4)
    assert got['mean']['low'] == pytest.approx(0.15 - half, abs=1e-4)
    weighted_differences = [weighted(a) - weighted(b)
                            for a, b in zip(selected_tests, local_tests)]
    assert got['differences_weighted'] == pytest.approx(weighted_differences)
    assert got['weighted']['std'] == pytest.approx(statistics.stdev(weighted_differences))
    table = sweep.summary_markdown(summary)
    assert f"+15.0 [{100 * (0.15 - half):+.1f}, {100 * (0.15 + half):+.1f}]" in table
    assert '1: +5.0, 2: +25.0, 3: +15.0' in table and 'seeds are the unit' in table
    assert '| local | 1, 2, 3 |' in table and '(baseline)' in table
    assert summary['code'] == [{'commit': 'a' * 40, 'clean': True}]


def test_a_search_chooses_the_setting_of_highest_validation_accuracy(tmp_path):
    """The two algorithms of the fixture as two settings of one search (no compared axis),
    then as two searches of one setting each (compared along algorithm)."""
    write_fixture(tmp_path)
    runs = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], None, [])
    by_algorithm = {e['setting']['algorithm']: e for e in summary['settings']}
    # weighted validation accuracy (1 x v0 + 3 x v1) / 4 at each seed's selected round
    assert by_algorithm['quped']['selected_validation']['values'] == pytest.approx(
        [0.75, 0.9, 0.55])
    assert by_algorithm['local']['selected_validation']['values'] == pytest.approx(
        [0.55, 0.5, 0.4])
    chosen, = summary['chosen_on_validation']
    assert chosen['group'] is None and chosen['tried'] == 2
    assert chosen['setting'] == {'algorithm': 'quped'}
    assert chosen['validation'] == pytest.approx(2.2 / 3)
    table = sweep.summary_markdown(summary)
    assert '| quped | 1, 2, 3 | 73.3 ± 17.6 |' in table
    assert 'Chosen on validation: algorithm=quped (73.3 %, of 2 tried).' in table
    per_algorithm = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', [])
    assert [(c['group'], c['tried']) for c in per_algorithm['chosen_on_validation']] == [
        ('quped', 1), ('local', 1)]
    assert 'Chosen on validation among the local settings: algorithm=local (48.3 %, of 1 ' \
           'tried).' in sweep.summary_markdown(per_algorithm)


def test_a_tie_goes_to_the_first_setting_and_names_the_others():
    entries = [{'setting': {'ft_epochs': e, 'lambda_coef': c},
                'selected_validation': {'mean': v}}
               for (e, c), v in zip([('1', '1e-3'), ('2', '1e-3'), ('1', '1e-2'), ('2', '1e-2')],
                                    [0.6, 0.7, 0.6, 0.7])]
    chosen, = sweep.chosen_on_validation(entries, None)
    assert chosen['setting'] == {'ft_epochs': '2', 'lambda_coef': '1e-3'}
    assert chosen['tied_with'] == [{'ft_epochs': '2', 'lambda_coef': '1e-2'}]
    table = sweep.summary_markdown({'axes': [], 'baselines': [], 'level': 0.95, 'settings': [],
                                    'chosen_on_validation': [chosen], 'left_out': [],
                                    'code': []})
    assert ('ft_epochs=2, lambda_coef=1e-3 (70.0 %, of 4 tried; tied with ft_epochs=2, '
            'lambda_coef=1e-2)') in table


def assert_own_intervals(versus, where):
    """A paired comparison's intervals, per personalised architecture too, are this code's t
    intervals over its own per-seed differences."""
    for stat in ('mean', 'weighted'):
        assert versus[stat] == pytest.approx(sweep.mean_and_interval(
            versus[f'differences_{stat}'])), (where, stat)
    for arch, by_arch in versus.get('by_arch', {}).items():
        assert by_arch['seeds'] == versus['seeds']
        assert by_arch['mean'] == pytest.approx(sweep.mean_and_interval(
            by_arch['differences_mean'])), (where, arch)


def test_the_committed_pairs_hold_the_intervals_of_their_own_per_seed_differences():
    """Every `sweep.py --pair --out` file under docs/results: no figure there was edited by
    hand or made by another formula."""
    files = sorted((ROOT / 'docs' / 'results').glob('*/pairs/*.json'))
    assert files
    for path in files:
        with open(path) as f:
            pair = json.load(f)
        assert pair['unit'] == 'seed'
        for when in ('selected', 'last'):
            versus = pair[when]
            assert versus['seeds'] == list(pair['runs']) and len(versus['seeds']) >= 2
            assert_own_intervals(versus, (path.name, when))


def test_the_committed_summaries_hold_the_intervals_of_their_own_per_seed_differences():
    """Every seed-level summary.json sweep.py wrote under docs/results, as the pairs above;
    where the clients split evenly between two architectures (clients of every kind in turn),
    a seed's difference over all its clients is the mean of its two architectures'."""
    summaries = {path: json.loads(path.read_text())
                 for path in sorted((ROOT / 'docs' / 'results').glob('**/summary.json'))}
    summaries = {path: summary for path, summary in summaries.items()  # sweep.py's own
                 if summary.get('unit') == 'seed' and 'settings' in summary}
    assert summaries
    for path, summary in summaries.items():
        for entry in summary['settings']:
            for versus in (v[when] for v in entry.get('vs', {}).values() if v
                           for when in ('selected', 'last') if v[when]):
                assert_own_intervals(versus, path)
                by_arch = versus.get('by_arch', {})
                if len(by_arch) == 2:
                    a, b = (arch['differences_mean'] for arch in by_arch.values())
                    assert versus['differences_mean'] == pytest.approx(
                        [(x + y) / 2 for x, y in zip(a, b)]), path


def test_runs_of_two_sweeps_pair_by_seed_as_within_one(tmp_path, capsys):
    """--pair on the fixture's quped runs and --to its local runs, as if they were two
    sweeps' folders, gives the summary's paired differences."""
    write_fixture(tmp_path)
    runs = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', ['local'])
    within = next(e for e in summary['settings']
                  if e['setting'] == {'algorithm': 'quped'})['vs']['local']
    out = tmp_path / 'pairs.json'
    sweep.main([f'--pair={tmp_path}/seed=*,algorithm=quped',
                f'--to={tmp_path}/seed=*,algorithm=local', f'--out={out}'])
    across = json.loads(out.read_text())
    for when in ('selected', 'last'):
        assert across[when]['seeds'] == within[when]['seeds'] == ['1', '2', '3']
        assert across[when]['differences_mean'] == pytest.approx(
            within[when]['differences_mean'])
        assert across[when]['weighted'] == pytest.approx(within[when]['weighted'])
    assert across['runs']['2'] == [str(tmp_path / 'seed=2,algorithm=quped'),
                                   str(tmp_path / 'seed=2,algorithm=local')]
    assert '1: +5.0, 2: +25.0, 3: +15.0' in capsys.readouterr().out


def test_pairing_needs_one_run_a_seed_on_each_side(tmp_path, capsys):
    write_fixture(tmp_path)
    exits_with_error(capsys, sweep.main, [f'--pair={tmp_path}/seed=1,*',
                                          f'--to={tmp_path}/seed=*,algorithm=local'],
                     'are runs of seed 1: narrow the pattern')
    exits_with_error(capsys, sweep.main, [f'--pair={tmp_path}/seed=9*',
                                          f'--to={tmp_path}/seed=*,algorithm=local'],
                     "no finished run's folder matches")
    exits_with_error(capsys, sweep.main, [f'--pair={tmp_path}/seed=1,algorithm=quped',
                                          f'--to={tmp_path}/seed=2,algorithm=local'],
                     'no seed has a finished run on both sides (seeds 1 against 2)')
    exits_with_error(capsys, sweep.main, [f'--pair={tmp_path}/seed=*,algorithm=quped'],
                     '--pair needs --to=PATTERN')


MIXED = {  # (algorithm, seed): test accuracy of clients 0 to 3, at the one round
    ('quped', 1): [0.6, 0.8, 0.5, 0.7], ('local', 1): [0.5, 0.6, 0.6, 0.6],
    ('quped', 2): [0.7, 0.7, 0.4, 0.6], ('local', 2): [0.6, 0.6, 0.5, 0.5],
    ('quped', 3): [0.9, 0.7, 0.6, 0.6], ('local', 3): [0.6, 0.6, 0.4, 0.6],
}


def write_mixed_fixture(sweep_dir, client_archs=('cifarnet', 'cifarnet2')):
    """Runs of 4 clients, 10 test images each, of client_archs x bits (1, 2): the kinds taken
    in turn make clients 0 and 1 the first architecture's, 2 and 3 the second's. No row names
    a client's architecture, as FedAvg-FT's name the global model's."""
    for (algorithm, seed), tests in MIXED.items():
        folder = sweep_dir / f'seed={seed},algorithm={algorithm}'
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(
            {'kind': 'federated', 'rounds': 1, 'seed': seed, 'algorithm': algorithm,
             'client_archs': list(client_archs), 'client_bits': [1, 2]}))
        clients = [{'client': i, 'q_val_acc': 0.5, 'q_test_acc': t, 'n_val': 10,
                    'n_test': 10} for i, t in enumerate(tests)]
        row = {'round': 1, 'clients': clients, 'q_val_acc_weighted': 0.5,
               'q_test_acc_weighted': statistics.fmean(tests),
               'q_test_acc_mean': statistics.fmean(tests)}
        (folder / 'metrics.jsonl').write_text(json.dumps(row) + '\n')


def test_clients_of_mixed_architectures_are_also_paired_per_architecture(tmp_path, capsys):
    write_mixed_fixture(tmp_path)
    planned = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, planned, ['seed', 'algorithm'], 'algorithm', ['local'])
    quped = next(e for e in summary['settings'] if e['setting'] == {'algorithm': 'quped'})
    # seed 1: cifarnet (0.6 + 0.8) / 2 - (0.5 + 0.6) / 2 = 0.15, cifarnet2 0.6 - 0.6 = 0;
    # seed 2: 0.7 - 0.6 = 0.1 and 0.5 - 0.5 = 0; seed 3: 0.8 - 0.6 = 0.2 and 0.6 - 0.5 = 0.1
    assert quped['selected_mean_by_arch']['cifarnet']['values'] == pytest.approx([0.7, 0.7, 0.8])
    got = quped['vs']['local']['selected']
    assert got['differences_mean'] == pytest.approx([0.075, 0.05, 0.15])
    cifarnet, cifarnet2 = got['by_arch']['cifarnet'], got['by_arch']['cifarnet2']
    assert cifarnet['differences_mean'] == pytest.approx([0.15, 0.1, 0.2])
    assert cifarnet2['differences_mean'] == pytest.approx([0.0, 0.0, 0.1])
    half = 4.3027 * 0.05 / math.sqrt(3)  # t(0.975, 2) x sd 0.05 / sqrt(3)
    assert cifarnet['mean']['mean'] == pytest.approx(0.15)
    assert cifarnet['mean']['half_width'] == pytest.approx(half, abs=1e-4)
    table = sweep.summary_markdown(summary)
    assert (f"| quped | cifarnet | 73.3 ± 5.8 | +15.0 [{100 * (0.15 - half):+.1f}, "
            f"{100 * (0.15 + half):+.1f}] ±{100 * half:.1f} | 1: +15.0, 2: +10.0, 3: +20.0 |"
            ) in table
    sweep.main([f'--pair={tmp_path}/seed=*,algorithm=quped',
                f'--to={tmp_path}/seed=*,algorithm=local'])
    assert '| chosen on validation, cifarnet2 clients | 1, 2, 3 | +3.3 [' in \
        capsys.readouterr().out


TEACHERS = {  # (algorithm, seed): per client 0 to 3 (teacher's own-class val, student's val)
    ('quped', 1): [(0.6, 0.7), (0.8, 0.7), (0.5, 0.4), (0.7, 0.6)],
    ('strong', 1): [(0.8, 0.7), (0.9, 0.8), (0.7, 0.5), (0.9, 0.6)],
    ('quped', 2): [(0.5, 0.6), (0.7, 0.7), (0.6, 0.4), (0.6, 0.5)],
    ('strong', 2): [(0.7, 0.6), (0.8, 0.8), (0.8, 0.6), (0.7, 0.5)],
}


def write_teacher_fixture(sweep_dir, client_archs=('cifarnet', 'cifarnet2')):
    """One-round runs of 4 clients (clients 0 and 1 cifarnet, 2 and 3 cifarnet2) whose rows
    score each client's teacher: QuPeD, QuPeD from a strong teacher ('strong', a QuPeD run),
    FedAvg (a teacher, no students: its teacher as quped's), and local training (none)."""
    others = [*((('fedavg', s), TEACHERS['quped', s]) for s in (1, 2)),
              *((('local', s), [(None, 0.5)] * 4) for s in (1, 2))]
    for (algorithm, seed), clients in [*TEACHERS.items(), *others]:
        folder = sweep_dir / f'seed={seed},algorithm={algorithm}'
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(
            {'kind': 'federated', 'rounds': 1, 'seed': seed,
             'algorithm': 'quped' if algorithm == 'strong' else algorithm,
             'client_archs': list(client_archs), 'client_bits': [1, 2]}))
        entries = [{'client': i, 'q_val_acc': v, 'q_test_acc': v, 'n_val': 10, 'n_test': 10,
                    'global_val_acc_own': t} for i, (t, v) in enumerate(clients)]
        mean = statistics.fmean(v for _, v in clients)
        row = {'round': 1, 'clients': entries, 'q_val_acc_weighted': mean,
               'q_test_acc_weighted': mean, 'q_test_acc_mean': mean}
        (folder / 'metrics.jsonl').write_text(json.dumps(row) + '\n')


def test_the_teachers_are_scored_per_setting_and_paired_per_architecture(tmp_path, capsys):
    write_teacher_fixture(tmp_path)
    planned = [{'seed': str(s), 'algorithm': a} for s in (1, 2)
               for a in ('quped', 'strong', 'fedavg', 'local')]
    summary = sweep.summarise(tmp_path, planned, ['seed', 'algorithm'], 'algorithm',
                              ['quped', 'local'])
    entry = {e['setting']['algorithm']: e for e in summary['settings']}
    quped, strong = entry['quped'], entry['strong']
    # quped's teachers, seed 1: all (0.6 + 0.8 + 0.5 + 0.7) / 4, cifarnet 0.7, cifarnet2 0.6;
    # seed 2: 0.6, 0.6, 0.6
    assert quped['selected_teacher']['all']['values'] == pytest.approx([0.65, 0.6])
    assert quped['selected_teacher']['cifarnet']['values'] == pytest.approx([0.7, 0.6])
    assert quped['selected_teacher']['cifarnet2']['values'] == pytest.approx([0.6, 0.6])
    # students - teacher per client, seed 1: +0.1, -0.1, -0.1, -0.1; seed 2: +0.1, 0, -0.2, -0.1
    gap = quped['selected_student_minus_teacher']
    assert gap['all']['differences_mean'] == pytest.approx([-0.05, -0.05])
    assert gap['cifarnet']['differences_mean'] == pytest.approx([0.0, 0.05])
    assert gap['cifarnet2']['differences_mean'] == pytest.approx([-0.1, -0.15])
    assert gap['cifarnet2']['mean'] == pytest.approx(sweep.mean_and_interval([-0.1, -0.15]))
    # strong's teachers: seed 1 all 0.825, cifarnet 0.85, cifarnet2 0.8; seed 2 0.75 each
    teacher = strong['vs']['quped']['selected']['teacher']
    assert teacher['all']['differences_mean'] == pytest.approx([0.175, 0.15])
    assert teacher['cifarnet']['differences_mean'] == pytest.approx([0.15, 0.15])
    assert teacher['cifarnet2']['differences_mean'] == pytest.approx([0.2, 0.15])
    assert teacher['all']['mean']['mean'] == pytest.approx(0.1625)
    # FedAvg's clients have no model of their own: a teacher and no students; local training
    # has no teacher: no score, and no teacher in a pair with it
    assert entry['fedavg']['selected_teacher'] == quped['selected_teacher']
    assert 'selected_student_minus_teacher' not in entry['fedavg']
    assert entry['fedavg']['vs']['quped']['selected']['teacher']['all']['differences_mean'] == [
        0.0, 0.0]
    assert 'selected_teacher' not in entry['local']
    assert 'teacher' not in quped['vs']['local']['selected']
    table = sweep.summary_markdown(summary)
    assert '| quped | cifarnet2 | 60.0 ± 0.0 | -12.5 [' in table
    assert '| fedavg | all | 62.5 ± 3.5 | - | - | +0.0 [+0.0, +0.0] ±0.0 |' in table
    assert '| strong | all | 78.8 ± 5.3 |' in table and '1: +17.5, 2: +15.0' in table
    sweep.main([f'--pair={tmp_path}/seed=*,algorithm=strong',
                f'--to={tmp_path}/seed=*,algorithm=quped'])
    assert ("| chosen on validation, teacher's own-class validation accuracy, cifarnet2 clients "
            "| 1, 2 | +17.5 [") in capsys.readouterr().out


def test_teachers_over_different_client_groups_are_not_paired(tmp_path):
    """A mixed-architecture run against one of a single architecture on the same clients: the
    accuracies pair, the teachers (scored over different groups of clients) do not."""
    write_teacher_fixture(tmp_path / 'mixed')
    write_teacher_fixture(tmp_path / 'single', client_archs=('cifarnet',))
    pair = sweep.pair_runs(f'{tmp_path}/mixed/seed=*,algorithm=strong',
                           f'{tmp_path}/single/seed=*,algorithm=quped')
    assert pair['selected']['differences_mean'] == pytest.approx([0.05, 0.075])
    assert 'teacher' not in pair['selected'] and 'by_arch' not in pair['selected']


def halves_and_whole(tmp_path, write):
    """A fixture sweep's summary over seeds 1 to 3, and two over seeds 1-2 and 3 (as if two
    sweeps) written beside it."""
    write(tmp_path)

    def summary(seeds, name):
        planned = [{'seed': str(s), 'algorithm': a} for s in seeds for a in ('quped', 'local')]
        result = sweep.summarise(tmp_path, planned, ['seed', 'algorithm'], 'algorithm',
                                 ['local'])
        (tmp_path / name).write_text(json.dumps(result))
        return result
    return summary((1, 2), 'first.json'), summary((3,), 'second.json'), summary((1, 2, 3), '-')


@pytest.mark.parametrize('write', [write_fixture, write_mixed_fixture])
def test_combining_two_sweeps_of_different_seeds_pairs_as_one_sweep_of_all(
        tmp_path, capsys, write):
    *_, whole = halves_and_whole(tmp_path, write)
    out = tmp_path / 'combined' / 'summary.json'
    out.parent.mkdir()
    sweep.main([f'--combine={tmp_path / "first.json"}', f'--combine={tmp_path / "second.json"}',
                f'--out={out}'])
    combined = json.loads(out.read_text())
    within = next(e for e in whole['settings']
                  if e['setting'] == {'algorithm': 'quped'})['vs']['local']
    assert list(combined['comparisons']) == ['quped - local']
    for when in ('selected', 'last'):
        got, want = combined['comparisons']['quped - local'][when], within[when]
        assert got['seeds'] == want['seeds'] == ['1', '2', '3']
        for stat in ('mean', 'weighted'):
            assert got[f'differences_{stat}'] == pytest.approx(want[f'differences_{stat}'])
            assert got[stat] == pytest.approx(want[stat])
        if when == 'last':  # the summaries keep each architecture's selected round only
            assert 'by_arch' not in got
            continue
        assert set(got.get('by_arch', {})) == set(want.get('by_arch', {}))
        for arch, by_arch in want.get('by_arch', {}).items():
            assert got['by_arch'][arch]['mean'] == pytest.approx(by_arch['mean'])
    assert [s['seeds'] for s in combined['sources']] == [['1', '2'], ['3']]
    printed = capsys.readouterr().out
    assert '| quped - local | chosen on validation | 1, 2, 3 |' in printed
    assert (out.parent / 'summary.md').read_text() in printed


def test_combining_needs_different_seeds_and_says_what_one_summary_lacks(tmp_path, capsys):
    _, second, _ = halves_and_whole(tmp_path, write_fixture)
    args = [f'--combine={tmp_path / "first.json"}', f'--combine={tmp_path / "first.json"}']
    exits_with_error(capsys, sweep.main, args, 'seed 1 is in both')
    exits_with_error(capsys, sweep.main, args[:1], '--combine needs two summaries or more')
    exits_with_error(capsys, sweep.main, [*args[:1], f'--combine={tmp_path / "none.json"}'],
                     f'cannot read {tmp_path / "none.json"}')
    reversed_ = sweep.combine_summaries([str(tmp_path / 'first.json'),
                                         str(tmp_path / 'second.json')], ['quped'])
    assert list(reversed_['comparisons']) == ['local - quped']  # the test fixture's by hand:
    assert reversed_['comparisons']['local - quped']['selected']['mean'] == pytest.approx(
        sweep.mean_and_interval([-0.05, -0.25, -0.15]))
    second['settings'] = [e for e in second['settings']
                          if e['setting'] == {'algorithm': 'local'}]
    (tmp_path / 'second.json').write_text(json.dumps(second))
    combined = sweep.combine_summaries([str(tmp_path / 'first.json'),
                                        str(tmp_path / 'second.json')])
    assert combined['comparisons'] == {}
    assert combined['left_out'] == [{'comparison': 'quped - local',
                                     'reason': f'not in {tmp_path / "second.json"}'}]


def test_the_committed_combinations_are_their_sources_combined(tmp_path, monkeypatch):
    """Every `sweep.py --combine --out` file under docs/results is what the command makes from
    the committed summaries it names, and holds its own intervals."""
    files = [path for path in sorted((ROOT / 'docs' / 'results').glob('**/*.json'))
             if 'comparisons' in json.loads(path.read_text())]
    assert files
    monkeypatch.chdir(ROOT)
    for path in files:
        committed = json.loads(path.read_text())
        baselines = committed['baselines']
        sweep.main([*(f"--combine={s['summary']}" for s in committed['sources']),
                    *([f"--baseline={','.join(baselines)}"] if baselines else []),
                    f'--out={tmp_path / "again.json"}'])
        assert json.loads((tmp_path / 'again.json').read_text()) == committed, path
        for name, comparison in committed['comparisons'].items():
            for when, versus in comparison.items():
                if versus:
                    assert_own_intervals(versus, (path.name, name, when))


def test_runs_of_one_architecture_have_no_per_architecture_pairs(tmp_path):
    write_mixed_fixture(tmp_path, client_archs=('cifarnet',))
    planned = [{'seed': str(s), 'algorithm': a} for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, planned, ['seed', 'algorithm'], 'algorithm', ['local'])
    quped = next(e for e in summary['settings'] if e['setting'] == {'algorithm': 'quped'})
    assert 'selected_mean_by_arch' not in quped
    assert 'by_arch' not in quped['vs']['local']['selected']
    assert 'Per personalised architecture' not in sweep.summary_markdown(summary)


def test_seeds_with_settings_of_their_own_are_named_by_their_value(tmp_path):
    """--seed=1@global_pretrained=... (a teacher per seed): the summary names seed 1."""
    write_fixture(tmp_path)
    runs = [{'seed': f'{s}@global_pretrained=/teachers/{s}.pt', 'algorithm': a}
            for s in (1, 2, 3) for a in ('quped', 'local')]
    summary = sweep.summarise(tmp_path, runs, ['seed', 'algorithm'], 'algorithm', ['local'])
    quped = next(e for e in summary['settings'] if e['setting'] == {'algorithm': 'quped'})
    assert quped['seeds'] == ['1', '2', '3']
    assert quped['vs']['local']['selected']['seeds'] == ['1', '2', '3']
    assert '1: +5.0, 2: +25.0, 3: +15.0' in sweep.summary_markdown(summary)


def correlated_results(offsets, noise, clients=10):
    """{seed: run result} whose clients share their seed's offset."""
    return {str(seed): {'selected': {
        'weighted': 0.5 + offset, 'clients': {str(c): [0.5 + offset + noise * (c % 3 - 1), 10]
                                              for c in range(clients)}}}
        for seed, offset in enumerate(offsets)}


def test_seed_level_intervals_are_wider_than_pooled_ones_when_clients_share_their_seed():
    ours = correlated_results([0.05, 0.0, 0.04], 0.01)
    baseline = correlated_results([0.0, 0.0, 0.0], 0.0)
    names = {seed: ('a', 'b') for seed in ours}
    got = sweep.paired(ours, baseline, 'selected', names)['mean']
    pooled = sweep.mean_and_interval([
        ours[s]['selected']['clients'][c][0] - baseline[s]['selected']['clients'][c][0]
        for s in ours for c in ours[s]['selected']['clients']])
    assert got['n'] == 3 and pooled['n'] == 30
    assert got['mean'] == pytest.approx(pooled['mean'])
    assert got['half_width'] > 3 * pooled['half_width']
    assert got['low'] < 0 < got['high'] and pooled['low'] > 0  # pooling "resolves" noise


def test_runs_with_other_clients_cannot_be_paired():
    ours = correlated_results([0.0, 0.1], 0.0, clients=3)
    baseline = correlated_results([0.0, 0.1], 0.0, clients=2)
    with pytest.raises(sweep.SweepError, match='seed=0,algorithm=quped and '
                                               'seed=0,algorithm=local do not hold the same'):
        sweep.paired(ours, baseline, 'selected',
                     {s: (f'seed={s},algorithm=quped', f'seed={s},algorithm=local')
                      for s in ours})


def test_a_damaged_run_is_named_as_left_out(tmp_path, capsys):
    write_fixture(tmp_path / 's')
    (tmp_path / 's' / 'seed=2,algorithm=quped' / 'metrics.jsonl').write_text('{"round": 1\n')
    argv = [str(ROOT / 'main_federated.py'), '--sweep=s', f'--results_dir={tmp_path}',
            '--seed=1', '--seed=2', '--seed=3', '--algorithm=quped', '--algorithm=local',
            '--rounds=2', '--baseline=local']
    message = exits_with_error(capsys, sweep.main, argv, 'seed=2,algorithm=quped',
                               'is not a JSON object', 'leaves out 1 runs')
    summary = json.loads((tmp_path / 's' / 'summary.json').read_text())
    assert summary['left_out'][0]['run'] == 'seed=2,algorithm=quped'
    quped = next(e for e in summary['settings'] if e['setting'] == {'algorithm': 'quped'})
    assert quped['seeds'] == ['1', '3'] and quped['vs']['local']['selected']['seeds'] == ['1', '3']
    assert 'Left out: seed=2,algorithm=quped' in (tmp_path / 's' / 'summary.md').read_text()
    assert 'Traceback' not in message


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path, capsys):
    write_fixture(tmp_path / 's')
    argv = [str(ROOT / 'main_federated.py'), '--sweep=s', f'--results_dir={tmp_path}',
            '--seed=1', '--seed=2', '--seed=3', '--algorithm=quped', '--algorithm=local']
    sweep.main([*argv, '--rounds=2', '--lambda_p=0.1'])  # every run finished: nothing runs
    out = capsys.readouterr().out
    assert 'start' not in out and 'seed=1,algorithm=quped: finished' in out
    before = {p: p.read_bytes() for p in (tmp_path / 's').rglob('*') if p.is_file()}
    exits_with_error(capsys, sweep.main, [*argv, '--rounds=4', '--lambda_p=0.9'],
                     "rounds (2 in its config.json, 4 now)",
                     "lambda_p (0.1 in its config.json, 0.9 now)", '--sweep=s-2')
    exits_with_error(capsys, sweep.main, [*argv, '--rounds=2'],
                     'lambda_p (given as 0.1 before, not now)')
    assert before == {p: p.read_bytes() for p in (tmp_path / 's').rglob('*') if p.is_file()}


def test_a_full_precision_centralized_run_is_summarised_on_its_own_accuracy(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'EPOCHS': 3, 'fp': True, 'fp_epochs': 2,
                                                    'val_fraction': 0.1}))
    rows = [{'epoch': 1, 'val_acc': 0.5, 'test_acc': 0.4},
            {'epoch': 2, 'val_acc': 0.3, 'test_acc': 0.6}]
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert runs.status(folder) == 'finished'
    result = sweep.run_results(folder)
    assert result['selected']['weighted'] == 0.4 and result['selected']['round'] == 1
    assert result['selected']['validation'] == 0.5
    assert result['last']['mean'] == 0.6


@pytest.mark.parametrize('option, phrase', [
    ('--jobs=0', '--jobs=0 is not a whole number of 1 or more'),
    ('--jobs=-1', '--jobs=-1 is not a whole number'),
    ('--jobs=abc', '--jobs=abc is not a whole number'),
    ('--threads=0', '--threads=0 is not a whole number'),
    ('--sweep=../esc', 'is not a folder name'),
])
def test_bad_sweep_options(tmp_path, capsys, option, phrase):
    exits_with_error(capsys, sweep.main, [str(ROOT / 'main_federated.py'), option,
                                          f'--results_dir={tmp_path}/r', '--seed=1',
                                          '--seed=2'], phrase)
    assert not (tmp_path / 'esc').exists()


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, capsys):
    import fcntl
    folder = tmp_path / 's'
    folder.mkdir()
    with open(folder / 'sweep.lock', 'a') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        exits_with_error(capsys, sweep.main, [str(ROOT / 'main_federated.py'), '--sweep=s',
                                              f'--results_dir={tmp_path}', '--seed=1',
                                              '--seed=2'], 'another process is running the sweep')


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
               for row in runs.read_rows(sweep_dir / 'seed=2')]
    assert without == [{k: v for k, v in row.items() if not k.endswith('seconds')}
                       for row in runs.read_rows(whole)]
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
    ([str(ROOT / 'main_federated.py'), '--seed=1', '--seed=2', '--baseline=local'],
     'needs an axis to compare along: give --compare=NAME'),
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


# --- stopping a sweep ----------------------------------------------------------------------

def alive(pid):
    """Whether process `pid` runs (a zombie has ended)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            return not any(line.startswith('State:') and 'Z' in line for line in f)
    except FileNotFoundError:
        return False


def wait_for(condition, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_sweep_stops_its_run_and_a_rerun_finishes_it(cifar_root, tmp_path, signum,
                                                              capsys):
    """SIGTERM or SIGKILL to the sweep in its run's second round: the run stops too (on SIGTERM
    it says what it kept, exit status 143), keeping its completed rounds, and the same command
    again resumes it to the end."""
    argv = [str(ROOT / 'main_federated.py'), '--sweep=s', f'--results_dir={tmp_path}',
            '--threads=1', '--seed=1', *[a for a in tiny(cifar_root) if a != '--rounds=2'],
            '--rounds=40']
    folder = tmp_path / 's' / 'run'
    parent = subprocess.Popen([sys.executable, str(ROOT / 'sweep.py'), *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        assert wait_for(lambda: len(runs.read_rows(folder)) >= 1, 120)
        child = int((folder / '.lock').read_text())
        os.kill(parent.pid, signum)
        parent.wait(timeout=60)
        assert wait_for(lambda: not alive(child), 30), 'the run trains on without its sweep'
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
    done = torch.load(folder / 'last.pt', weights_only=True)['round']  # the log may lag by one
    assert 1 <= done < 40 and len(runs.read_rows(folder)) in (done - 1, done)
    log = (tmp_path / 's' / 'logs' / 'run.log').read_text()
    assert f'terminated: {folder} keeps rounds 1-{done}; continue with' in log
    assert 'Traceback' not in log
    if signum == signal.SIGTERM:
        assert parent.returncode == runtime.TERMINATED
    sweep.main(argv)
    assert 'run: killed' in capsys.readouterr().out
    assert len(runs.read_rows(folder)) == 40


def test_runs_not_started_when_a_sweep_stops_are_left_untouched(tmp_path):
    children = sweep.Children(dict(os.environ))
    children.stopping = True
    folder = str(tmp_path / 's' / 'run')
    assert children.run(folder, [sys.executable, '-c', 'pass']) is None
    assert not os.path.exists(os.path.join(tmp_path, 's', 'logs', 'run.log'))
