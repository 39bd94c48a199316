"""main_federated.py and the partitions in data.py: partitions, KD loss and averaging by hand,
client isolation, the three passes of a client iteration, equivalence of 'local' with
main_centralized.py, outputs, resume and bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import main_centralized as mc
import main_federated as mf
import resnet
import runtime
import training
import utils
from conftest import DEVICES, exits_with_error

TIMINGS = ('train_seconds', 'eval_seconds', 'wall_seconds')


def fed_args(cifar_root, tmp_path, *extra, name='fed'):
    return [f'--data_root={cifar_root}', f'--results_dir={tmp_path / "results"}',
            f'--run_name={name}', '--n_clients=4', '--classes_per_client=5', '--rounds=2',
            '--BATCH_SIZE=20', '--client_archs=(resnet8,cifarnet)', '--global_arch=resnet8',
            *extra]


def rows(folder):
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def without_timings(metrics):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics]


def fails_with(capsys, argv, *phrases):
    return exits_with_error(capsys, mf.main, argv, *phrases)


# --- partitions --------------------------------------------------------------------------------

def balanced_labels(per_class=60):
    order = torch.randperm(10 * per_class, generator=torch.Generator().manual_seed(1))
    return torch.arange(10).repeat_interleave(per_class)[order]


def test_pathological_partition_by_hand():
    labels = balanced_labels()
    parts = data.pathological_partition(labels, n_clients=20, classes_per_client=3, seed=0)
    counts = data.class_counts(labels, parts)
    everything = torch.cat(parts)
    assert everything.unique().numel() == everything.numel() == 600  # disjoint, all used
    assert all(torch.equal(p, p.sort().values) for p in parts)
    assert ((counts > 0).sum(1) == 3).all()  # three classes each
    assert ((counts > 0).sum(0) == 6).all()  # 20 x 3 / 10 holders per class
    assert set(counts[counts > 0].tolist()) == {10}  # 60 images split evenly among 6
    again = data.pathological_partition(labels, 20, 3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = data.pathological_partition(labels, 20, 3, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


def test_pathological_partition_splits_unevenly_held_classes_by_at_most_one():
    labels = balanced_labels(61)
    parts = data.pathological_partition(labels, n_clients=7, classes_per_client=2, seed=3)
    counts = data.class_counts(labels, parts)
    for k in range(10):
        held = counts[:, k][counts[:, k] > 0]
        assert held.max() - held.min() <= 1 and held.sum() == 61


@pytest.mark.parametrize('classes', [0, 11])
def test_pathological_partition_refuses_impossible_class_counts(classes):
    with pytest.raises(data.PartitionError, match='1 to 10'):
        data.pathological_partition(balanced_labels(), 4, classes, seed=0)


def test_pathological_partition_refuses_more_holders_than_images():
    labels = balanced_labels(3)
    with pytest.raises(data.PartitionError, match='3 training images but 6 of the 20 clients'):
        data.pathological_partition(labels, 20, 3, seed=0)


def test_dirichlet_partition_sizes_disjointness_and_determinism():
    labels = balanced_labels()
    parts = data.dirichlet_partition(labels, n_clients=7, alpha=0.5, seed=0)
    assert [p.numel() for p in parts] == [86] * 5 + [85] * 2  # 600 = 7 x 85 + 5
    everything = torch.cat(parts)
    assert everything.unique().numel() == 600
    again = data.dirichlet_partition(labels, 7, 0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_proportions_follow_alpha():
    labels = balanced_labels(500)
    flat = data.class_counts(labels, data.dirichlet_partition(labels, 10, 1000.0, seed=0))
    # the first clients draw from full pools; the last take what is left
    assert (flat[:5].float() / flat[:5].sum(1, keepdim=True)).sub(0.1).abs().max() < 0.05
    skewed = data.class_counts(labels, data.dirichlet_partition(labels, 10, 0.05, seed=0))
    top_share = skewed.max(1).values.float() / skewed.sum(1)
    assert (top_share > 0.5).float().mean() >= 0.7  # most clients dominated by one class


def test_dirichlet_partition_ends_for_tiny_alpha_and_many_clients():
    labels = balanced_labels(100)
    parts = data.dirichlet_partition(labels, n_clients=200, alpha=1e-3, seed=0)
    assert sum(p.numel() for p in parts) == 1000 and min(p.numel() for p in parts) == 5


def test_test_partition_follows_training_proportions_by_hand():
    train_counts = torch.tensor([[30, 10, 0] + [0] * 7, [10, 0, 5] + [0] * 7])
    test_labels = torch.tensor([0] * 20 + [1] * 9 + [2] * 4 + [3] * 5)
    parts = data.test_partition(test_labels, train_counts, seed=0)
    counts = data.class_counts(test_labels, parts)
    # floor(T_k n_ik / sum_j n_jk): class 0: 20*30/40 = 15, 20*10/40 = 5; class 1: 9; class 2: 4
    assert counts[:, :4].tolist() == [[15, 9, 0, 0], [5, 0, 4, 0]]
    assert torch.cat(parts).unique().numel() == 33


# --- the algorithm's parts by hand ---------------------------------------------------------------

def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    lam, temp = 0.3, 2.0
    rows_s, rows_t, labels = s.tolist(), t.tolist(), y.tolist()
    ce = sum(-math.log(math.exp(r[k]) / sum(math.exp(v) for v in r))
             for r, k in zip(rows_s, labels)) / 2
    kl = 0.0
    for r_s, r_t in zip(rows_s, rows_t):
        q = [math.exp(v / temp) for v in r_t]
        q = [v / sum(q) for v in q]
        log_p = [v - math.log(sum(math.exp(u) for u in r_s)) for v in r_s]  # student not / T
        kl += sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, log_p))
    want = (1 - lam) * ce + lam * temp ** 2 * kl / 2
    assert utils.kd_loss(s, y, t, lam, temp).item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(utils.kd_loss(s, y, t, 0.0, temp), F.cross_entropy(s, y))
    hinton = utils.kd_loss(s, y, t, lam, temp, scale_student=True)
    assert hinton.item() != pytest.approx(want, rel=1e-3)


def test_weighted_averaging_by_hand():
    a = {'w': torch.tensor([1.0, 2.0]), 'count': torch.tensor(4)}
    b = {'w': torch.tensor([5.0, -2.0]), 'count': torch.tensor(9)}
    out = mf.aggregate([a, b], [1, 3])
    assert out['w'].tolist() == [0.25 * 1 + 0.75 * 5, 0.25 * 2 - 0.75 * 2]
    assert out['count'].item() == (4 + 27) // 4


def test_cnn_clients_quantize_what_the_released_rule_quantizes():
    for arch, count in (('cifarnet', 62_006), ('cifarnet2', 156_074)):
        model = resnet.build(arch)
        assert sum(p.numel() for p in model.parameters()) == count
        names = utils.cnet_rule(model)
        params = dict(model.named_parameters())
        assert names and all(params[n].dim() > 1 and params[n].shape[0] != 10 for n in names)
        assert 'conv1.weight' not in names and not any(n.endswith('bias') for n in names)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- a client's round --------------------------------------------------------------------------

def small_run(cifar_root, tmp_path, *extra):
    cfg, _ = mf.make_config(fed_args(cifar_root, tmp_path, *extra))
    dev = torch.device('cpu')
    cifar = data.load_cifar10(cifar_root, dev)
    parts = mf.make_partition(cfg, cifar)
    clients, global_model = mf.initial_states(cfg, dev)
    return cfg, clients, global_model, mf.client_data(cifar, parts)


def snapshot(state):
    return ({k: v.clone() for k, v in state['model'].state_dict().items()},
            None if state['centers'] is None else state['centers'].clone(),
            state['generator'].get_state(), str(state['optimizer'].state_dict()['state']))


def test_a_client_round_leaves_every_other_client_and_the_global_model_untouched(cifar_root,
                                                                                 tmp_path):
    cfg, clients, global_model, datasets = small_run(cifar_root, tmp_path)
    before = [snapshot(s) for s in clients]
    global_before = {k: v.clone() for k, v in global_model.state_dict().items()}
    copy = resnet.build('resnet8')
    new_state, count, metrics = mf.client_round(cfg, clients[1], global_before, copy,
                                                datasets[1], mf.round_schedule(cfg, 0))
    after = [snapshot(s) for s in clients]
    for i in (0, 2, 3):
        assert all(torch.equal(before[i][0][k], after[i][0][k]) for k in before[i][0])
        assert torch.equal(before[i][2], after[i][2]) and before[i][3] == after[i][3]
        assert before[i][1] is None or torch.equal(before[i][1], after[i][1])
    assert any(not torch.equal(before[1][0][k], after[1][0][k]) for k in before[1][0])
    assert all(torch.equal(v, global_model.state_dict()[k]) for k, v in global_before.items())
    assert count == datasets[1]['train_y'].shape[0] and math.isfinite(metrics['train_loss'])
    assert any(not torch.equal(new_state[k], global_before[k]) for k in new_state)


def test_a_client_iteration_runs_three_forward_passes(cifar_root, tmp_path):
    cfg, clients, _, datasets = small_run(cifar_root, tmp_path)
    state = clients[0]
    copy = resnet.build('resnet8')
    calls = []
    for name, model in (('personal', state['model']), ('quantized', state['weights'].twin),
                        ('global', copy)):
        model.register_forward_hook(lambda *args, name=name: calls.append(name))
    x, y = next(data.train_batches(datasets[0], 20, state['generator']))
    mf.quped_client_step(cfg, state, copy, mf.global_optimizer_for(cfg, copy), x, y,
                         mf.round_schedule(cfg, 0), 1e-2)
    assert sorted(calls) == ['global', 'personal', 'quantized']


def test_the_global_step_distils_from_the_quantized_model_or_not(cifar_root, tmp_path):
    results = {}
    for kd in (True, False):
        cfg, clients, global_model, datasets = small_run(cifar_root, tmp_path,
                                                         f'--global_kd={kd}')
        copy = resnet.build('resnet8')
        state, _, metrics = mf.client_round(cfg, clients[0], global_model.state_dict(), copy,
                                            datasets[0], mf.round_schedule(cfg, 0))
        results[kd] = state, metrics
    assert any(not torch.equal(results[True][0][k], results[False][0][k])
               for k in results[True][0])


# --- whole runs --------------------------------------------------------------------------------

def test_local_with_one_client_reproduces_main_centralized(cifar_root, tmp_path):
    common = [f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--BATCH_SIZE=50',
              '--lambda_coef=1e-3', '--lr2_milestones=(1,)', '--center_reg_fix=True']
    central = mc.main(common + ['--run_name=c', '--resn=8', '--n_centroids=4',
                                '--cold_start=True', '--EPOCHS=3', '--freeze_epoch=3'])
    federated = mf.main(common + ['--run_name=f', '--algorithm=local', '--n_clients=1',
                                  '--classes_per_client=10', '--client_archs=(resnet8,)',
                                  '--client_bits=(2,)', '--rounds=3', '--freeze_round=3'])
    pairs = {'train_loss': 'train_loss', 'train_acc': 'train_acc', 'test_acc': 'fp_test_acc',
             'q_test_acc': 'q_test_acc', 'q_train_loss': 'q_train_loss', 'centers': 'centers',
             'members': 'members', 'lr1': 'lr1'}
    central_rows, federated_rows = rows(central), rows(federated)
    assert len(central_rows) == len(federated_rows) == 3
    for c, f in zip(central_rows, federated_rows):
        client = f['clients'][0]
        assert {k: c[k] for k in pairs} == {k: client[v] for k, v in pairs.items()}
        assert [c[k] for k in ('lambda', 'lambda2', 'lr2', 'frozen')] == [
            f[k] for k in ('lambda', 'lambda2', 'lr2', 'frozen')]
    assert [row['frozen'] for row in central_rows] == [False, False, True]


def test_a_run_writes_its_partition_metrics_and_a_loadable_best(cifar_root, tmp_path, capsys):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_bits=(1,0,2)'))
    out = capsys.readouterr().out
    assert out.count('round ') >= 2 and 'personalised quantized test acc mean' in out
    assert sorted(os.listdir(folder)) == ['best.pt', 'config.json', 'last.pt', 'metrics.jsonl',
                                          'partition.json']
    with open(os.path.join(folder, 'partition.json')) as f:
        parts = json.load(f)
    cifar = data.load_cifar10(cifar_root, 'cpu')
    assert [p['client'] for p in parts] == [0, 1, 2, 3]
    for p in parts:
        assert p['train_class_counts'] == torch.bincount(
            cifar['train_y'][p['train_indices']], minlength=10).tolist()
        assert p['test_class_counts'] == torch.bincount(
            cifar['test_y'][p['test_indices']], minlength=10).tolist()
    metrics = rows(folder)
    for row in metrics:
        assert [c['client'] for c in row['clients']] == [0, 1, 2, 3]
        accs = [c['q_test_acc'] for c in row['clients']]
        weights = [c['n_test'] for c in row['clients']]
        assert row['q_test_acc_mean'] == pytest.approx(sum(accs) / 4)
        assert row['q_test_acc_weighted'] == pytest.approx(
            sum(a * w for a, w in zip(accs, weights)) / sum(weights))
        assert row['q_test_acc_min'] == min(accs) and row['q_test_acc_std'] >= 0
        assert row['global_test_acc_weighted'] is not None
        assert [c['bits'] for c in row['clients']] == [1, 32, 2, 1]  # 0 bits: full precision
        assert [c['arch'] for c in row['clients']] == ['resnet8', 'cifarnet'] * 2
    best = max(metrics, key=lambda row: row['q_test_acc_mean'])
    for client in range(4):
        model, info = mf.load_client_model(os.path.join(folder, 'best.pt'), client)
        assert info['round'] == best['round']
        test = torch.tensor(parts[client]['test_indices'])
        _, accuracy = runtime.evaluate(model, cifar['test_x'][test], cifar['test_y'][test])
        assert accuracy == best['clients'][client]['q_test_acc']
        if info['centers'] is not None:  # the quantized layers sit on their centers
            weights = utils.QuantizedWeights(model, utils.cnet_rule(model)
                                             if info['arch'] == 'cifarnet' else None)
            assert torch.equal(weights.flat(), utils.quantize(weights.flat(), weights.layer,
                                                              info['centers'])[0])


def test_fedavg_reports_the_global_model_for_every_client(cifar_root, tmp_path):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg'))
    for row in rows(folder):
        for client in row['clients']:
            assert client['q_test_acc'] == client['fp_test_acc'] == client['global_test_acc']
        assert row['q_test_acc_weighted'] == row['global_test_acc_weighted']
    model, info = mf.load_client_model(os.path.join(folder, 'best.pt'), 2)
    assert info['arch'] == 'resnet8' and info['bits'] == 0


def test_client_sampling(cifar_root, tmp_path):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_fraction=0.5', '--rounds=3'))
    sampled = [row['sampled'] for row in rows(folder)]
    assert all(len(s) == 2 and s == sorted(s) for s in sampled)
    assert len({tuple(s) for s in sampled}) > 1
    for row in rows(folder):
        for client in row['clients']:
            assert client['sampled'] == (client['client'] in row['sampled'])
            assert ('train_loss' in client) == client['sampled']


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the run catches it."""


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('algorithm', ['quped', 'fedavg'])
def test_resume_reproduces_an_uninterrupted_run(cifar_root, tmp_path, monkeypatch, algorithm,
                                                device):
    args = ('--rounds=3', f'--algorithm={algorithm}', '--client_fraction=0.75',
            '--freeze_round=2', f'--device={device}')
    whole = mf.main(fed_args(cifar_root, tmp_path, *args, name='whole'))
    real_save_last = mf.save_last

    def killed_after_round_1(cfg, run, folder, rows_so_far):
        real_save_last(cfg, run, folder, rows_so_far)
        if len(rows_so_far) == 1:
            raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(mf, 'save_last', killed_after_round_1)
        with pytest.raises(Killed):
            mf.main(fed_args(cifar_root, tmp_path, *args, name='killed'))
    folder = tmp_path / 'results' / 'killed'
    assert not (folder / 'metrics.jsonl').exists()  # the kill came before the log
    mf.main([f'--resume={folder}'])
    assert without_timings(rows(folder)) == without_timings(rows(whole))


@pytest.mark.parametrize('args, phrases', [
    (['--n_clients=100', '--classes_per_client=5'], ['but 50 of the 100 clients hold it']),
    (['--classes_per_client=0'], ['classes_per_client=0', '1 to 10']),
    (['--classes_per_client=11'], ['classes_per_client=11']),
    (['--client_archs=(resnet8,resnet9)'], ['resnet9', 'cifarnet2']),
    (['--global_arch=vgg'], ['vgg']),
    (['--algorithm=fedprox'], ["algorithm='fedprox'", 'quped, fedavg, local']),
    (['--partition=iid'], ["partition='iid'"]),
    (['--client_bits=(1,9)'], ['client_bits']),
    (['--client_fraction=0'], ['client_fraction=0.0']),
    (['--lambda_p=1.5'], ['lambda_p=1.5']),
    (['--dirichlet_alpha=0'], ['dirichlet_alpha=0.0']),
    (['--BATCH_SIZE=1'], ['two or more training images']),
])
def test_bad_input(cifar_root, tmp_path, capsys, args, phrases):
    fails_with(capsys, fed_args(cifar_root, tmp_path, *args), *phrases)
    assert not (tmp_path / 'results').exists()


def test_a_client_not_sampled_in_the_freeze_round_freezes_at_its_next_round():
    torch.manual_seed(0)
    model = resnet.build('resnet8')
    optimizer, scheduler = training.build_optimizer(model, adam=True)
    state = training.new_state(model, 2, optimizer, scheduler, torch.Generator(), True)
    after_freeze = training.schedule(5, 1e-4, 1e-4, (), freeze_epoch=3)
    assert after_freeze['frozen'] and not after_freeze['freeze_now']
    weights = state['weights']
    before = weights.flat()
    training.start_epoch(state, after_freeze)
    quantized = utils.quantize(before, weights.layer, state['centers'])[0]
    assert torch.equal(weights.flat(), quantized) and training.is_frozen(state)
    state['centers'] += 0.01  # a later round quantizes nothing again
    training.start_epoch(state, training.schedule(6, 1e-4, 1e-4, (), freeze_epoch=3))
    assert torch.equal(weights.flat(), quantized)
