"""federated.py, main_federated.py and the partitions in data.py: partitions and the validation
split, KD loss and averaging by hand, client isolation, the numbers of a client iteration, QuPeL
against a hand-written Ditto step, equivalence of 'local' with main_centralized.py, FedAvg-FT
against FedAvg, outputs, resume and bad input."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import federated
import main_centralized as mc
import main_federated as mf
import resnet
import runs
import runtime
import training
import utils
from conftest import (DEVICES, Killed, ROOT, assert_same_best, cnn_fed_args, exits_with_error,
                      kill_after_round)

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


def test_groups_share_a_class_set_one_client_per_bit_width_and_no_client_is_a_copy():
    """20 clients, 3 classes, bits (1, 2): the 1-bit and 2-bit clients hold the same class
    sets, and no two clients hold the same class set with the same bits."""
    cfg = {**mf.DEFAULTS, 'n_clients': 20, 'classes_per_client': 3, 'client_bits': (1, 2),
           'client_archs': ('cifarnet2',)}
    labels = balanced_labels()
    parts = data.pathological_partition(labels, 20, 3, seed=5,
                                        group_size=len(federated.client_kinds(cfg)))
    sets = [tuple((c > 0).nonzero().flatten().tolist()) for c in data.class_counts(labels, parts)]
    bits = [federated.client_plan(cfg, client)[1] for client in range(20)]
    assert sorted(s for s, b in zip(sets, bits) if b == 1) == sorted(
        s for s, b in zip(sets, bits) if b == 2)
    assert len(set(zip(sets, bits))) == 20 and len(set(sets)) == 10
    assert all(len(s) == 3 for s in sets)


def test_validation_split_is_disjoint_stratified_and_seeded():
    labels = balanced_labels(100)
    parts = data.pathological_partition(labels, 5, 4, seed=0)
    train, val = data.validation_split(labels, parts, 0.15, seed=3)
    for share, tr, va in zip(parts, train, val):
        assert torch.equal(torch.sort(torch.cat([tr, va])).values, share)  # disjoint, complete
        share_counts = torch.bincount(labels[share], minlength=10)
        val_counts = torch.bincount(labels[va], minlength=10)
        expected = torch.floor(0.15 * share_counts + 0.5).long()
        assert torch.equal(val_counts, expected)  # per class: round(15 % of its images)
    again = data.validation_split(labels, parts, 0.15, seed=3)[1]
    other = data.validation_split(labels, parts, 0.15, seed=4)[1]
    assert all(torch.equal(a, b) for a, b in zip(val, again))
    assert any(not torch.equal(a, b) for a, b in zip(val, other))


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
    kl_hinton = 0.0  # Hinton's form: the student's logits divided by T too
    for r_s, r_t in zip(rows_s, rows_t):
        q = [math.exp(v / temp) for v in r_t]
        q = [v / sum(q) for v in q]
        log_p = [v / temp - math.log(sum(math.exp(u / temp) for u in r_s)) for v in r_s]
        kl_hinton += sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, log_p))
    hinton = (1 - lam) * ce + lam * temp ** 2 * kl_hinton / 2
    assert utils.kd_loss(s, y, t, lam, temp, scale_student=True).item() == pytest.approx(
        hinton, rel=1e-6)
    assert hinton != pytest.approx(want, rel=1e-3)


def test_weighted_averaging_by_hand():
    a = {'w': torch.tensor([1.0, 2.0]), 'count': torch.tensor(4)}
    b = {'w': torch.tensor([5.0, -2.0]), 'count': torch.tensor(9)}
    out = federated.aggregate([a, b], [1, 3])
    assert out['w'].tolist() == [0.25 * 1 + 0.75 * 5, 0.25 * 2 - 0.75 * 2]
    assert out['count'].item() == (4 + 27) // 4
    uniform = federated.aggregate([a, b], [1, 1])
    assert uniform['w'].tolist() == [3.0, 0.0] and uniform['count'].item() == 6


def test_cnn_clients_quantize_what_the_released_rule_quantizes():
    for arch, count in (('cifarnet', 62_006), ('cifarnet2', 156_074)):
        model = resnet.build(arch)
        assert sum(p.numel() for p in model.parameters()) == count
        names = utils.cnet_rule(model)
        params = dict(model.named_parameters())
        assert names and all(params[n].dim() > 1 and params[n].shape[0] != 10 for n in names)
        assert 'conv1.weight' not in names and not any(n.endswith('bias') for n in names)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_client_kinds_are_every_architecture_with_every_bit_width():
    cfg = {**mf.DEFAULTS, 'client_archs': ('resnet8', 'cifarnet'), 'client_bits': (1, 0, 2)}
    plans = [federated.client_plan(cfg, client) for client in range(8)]
    assert plans == [('resnet8', 1), ('resnet8', 0), ('resnet8', 2), ('cifarnet', 1),
                     ('cifarnet', 0), ('cifarnet', 2), ('resnet8', 1), ('resnet8', 0)]
    cfg['lambda_coef'] = (1e-5, 1e-6)
    assert federated.round_schedule(cfg, 2, 'cifarnet')['lam'] == pytest.approx(3e-6)
    assert federated.round_schedule(cfg, 2, 'resnet8')['lam'] == pytest.approx(3e-5)


# --- a client's round --------------------------------------------------------------------------

def small_run(cifar_root, tmp_path, *extra):
    cfg, _ = federated.make_config(mf.DEFAULTS, fed_args(cifar_root, tmp_path, *extra))
    dev = torch.device('cpu')
    cifar = data.load_cifar10(cifar_root, dev)
    parts = federated.make_partition(cfg, cifar)
    clients = [federated.new_client_state(cfg, client, dev) for client in range(4)]
    return (cfg, clients, federated.new_global_model(cfg, dev),
            [federated.client_dataset(cifar, part) for part in parts])


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
    new_state, weight, metrics = federated.client_round(cfg, 1, clients[1], global_before, copy,
                                                        datasets[1], 0)
    after = [snapshot(s) for s in clients]
    for i in (0, 2, 3):
        assert all(torch.equal(before[i][0][k], after[i][0][k]) for k in before[i][0])
        assert torch.equal(before[i][2], after[i][2]) and before[i][3] == after[i][3]
        assert before[i][1] is None or torch.equal(before[i][1], after[i][1])
    assert any(not torch.equal(before[1][0][k], after[1][0][k]) for k in before[1][0])
    assert all(torch.equal(v, global_model.state_dict()[k]) for k, v in global_before.items())
    assert weight == datasets[1]['train_y'].shape[0] and math.isfinite(metrics['train_loss'])
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
    federated.quped_client_step(cfg, state, copy, federated.global_optimizer_for(cfg, state, copy),
                                x, y, federated.round_schedule(cfg, 0, 'resnet8'), 1e-2)
    assert sorted(calls) == ['global', 'personal', 'quantized']


def recorded_kd_calls(monkeypatch):
    calls = []
    real = utils.kd_loss

    def recording(student, y, teacher, lambda_p, temp, scale_student=False):
        calls.append({'student': student.detach().clone(), 'teacher': teacher.detach().clone(),
                      'lambda_p': lambda_p, 'scale_student': scale_student})
        return real(student, y, teacher, lambda_p, temp, scale_student)
    monkeypatch.setattr(utils, 'kd_loss', recording)
    return calls


@pytest.mark.parametrize('teacher_train_mode', [True, False])
@pytest.mark.parametrize('global_teacher', ['quantized', 'full_precision'])
def test_the_numbers_of_a_quped_client_iteration(cifar_root, tmp_path, monkeypatch,
                                                 teacher_train_mode, global_teacher):
    """Which logits teach (a), (b) and (c), with which KD form and weight, and the prox step
    after (a): each against a model computed apart from the step."""
    cfg, clients, global_model, datasets = small_run(
        cifar_root, tmp_path, f'--teacher_train_mode={teacher_train_mode}',
        f'--global_teacher={global_teacher}', '--kd_form=hinton', '--kd_form_center=released',
        '--lambda_p=0.3', '--global_lambda_p=0.6', '--lambda_coef=(0.05,)')
    state = clients[0]
    global_copy = resnet.build('resnet8')
    global_copy.load_state_dict(global_model.state_dict())
    x, y = next(data.train_batches(datasets[0], 20, state['generator']))
    sched = federated.round_schedule(cfg, 3, 'resnet8')
    # independent expectations, from copies taken before the step
    teacher_copy = copy.deepcopy(global_copy).train(teacher_train_mode)
    want_teacher = teacher_copy(x).detach()
    personal = copy.deepcopy(state['model'])
    optimizer = torch.optim.Adam(personal.parameters(), lr=1e-2)
    optimizer.load_state_dict(state['optimizer'].state_dict())
    optimizer.zero_grad()
    utils.kd_loss(personal(x), y, want_teacher, 0.3, cfg['temp'], True).backward()
    optimizer.step()
    want_fp_logits = None
    centers = state['centers'].clone()
    weights = utils.QuantizedWeights(personal)
    utils.prox_step(weights, centers, 1e-2, sched['lam'], lr2=sched['lr2'])
    want_after_prox = weights.flat()
    quantized = copy.deepcopy(personal).train()
    quantized.load_state_dict({**personal.state_dict(),
                               **utils.quantized_state(weights, centers)})
    want_quantized_logits = quantized(x).detach()

    calls = recorded_kd_calls(monkeypatch)
    optimizer_g = federated.global_optimizer_for(cfg, state, global_copy)
    federated.quped_client_step(cfg, state, global_copy, optimizer_g, x, y, sched, 1e-2)
    a, b, c = calls
    want_fp_logits = a['student']
    assert torch.equal(a['teacher'], want_teacher) and (a['lambda_p'], a['scale_student']) == (
        0.3, True)
    assert torch.equal(b['teacher'], want_teacher) and (b['lambda_p'], b['scale_student']) == (
        0.3, False)
    assert torch.equal(b['student'], want_quantized_logits)
    assert torch.equal(c['teacher'], want_quantized_logits if global_teacher == 'quantized'
                       else want_fp_logits)
    assert (c['lambda_p'], c['scale_student']) == (0.6, True)
    if teacher_train_mode:  # one forward of w_i is both the teacher and (c)'s student
        assert torch.equal(c['student'], want_teacher)
    assert torch.equal(state['weights'].flat(), want_after_prox)


@pytest.mark.parametrize('kd_form, kd_form_center, center_scales', [
    ('hinton', '', True), ('released', '', False), ('hinton', 'released', False),
    ('released', 'hinton', True)])
def test_the_center_step_distils_with_kd_form_unless_its_own_form_is_set(
        cifar_root, tmp_path, monkeypatch, kd_form, kd_form_center, center_scales):
    cfg, clients, global_model, datasets = small_run(
        cifar_root, tmp_path, f'--kd_form={kd_form}', f'--kd_form_center={kd_form_center}')
    state = clients[0]
    global_copy = resnet.build('resnet8')
    global_copy.load_state_dict(global_model.state_dict())
    x, y = next(data.train_batches(datasets[0], 20, state['generator']))
    calls = recorded_kd_calls(monkeypatch)
    federated.quped_client_step(cfg, state, global_copy,
                                federated.global_optimizer_for(cfg, state, global_copy), x, y,
                                federated.round_schedule(cfg, 3, 'resnet8'), 1e-2)
    assert [call['scale_student'] for call in calls] == [
        kd_form == 'hinton', center_scales, kd_form == 'hinton']


def test_qupel_with_full_precision_clients_is_ditto(cifar_root, tmp_path):
    """One QuPeL iteration at bits 0 against a hand-written Ditto step: the personal model on
    cross-entropy plus lambda/2 ||v - w||^2 (Adam), the global copy on cross-entropy (SGD)."""
    cfg, clients, global_model, datasets = small_run(
        cifar_root, tmp_path, '--algorithm=qupel', '--client_bits=(0,)',
        '--client_archs=(resnet8,)', '--lambda_p=0.4')
    state = clients[0]
    assert state['weights'] is None
    w = resnet.build('resnet8')
    w.load_state_dict(global_model.state_dict())
    v_ref, w_ref = copy.deepcopy(state['model']), copy.deepcopy(w)
    x, y = next(data.train_batches(datasets[0], 20, state['generator']))
    v_opt = torch.optim.Adam(v_ref.parameters(), lr=1e-2)
    w_opt = torch.optim.SGD(w_ref.parameters(), lr=cfg['global_lr'], momentum=0.9)
    v_opt.zero_grad()
    pull = sum(((p - q.detach()) ** 2).sum() for p, q in zip(v_ref.parameters(),
                                                             w_ref.parameters()))
    (F.cross_entropy(v_ref(x), y) + 0.4 / 2 * pull).backward()
    v_opt.step()
    w_opt.zero_grad()
    F.cross_entropy(w_ref(x), y).backward()
    w_opt.step()
    federated.qupel_client_step(cfg, state, w, federated.global_optimizer_for(cfg, state, w), x,
                                y, federated.round_schedule(cfg, 0, 'resnet8'), 1e-2)
    for got, want in ((state['model'], v_ref), (w, w_ref)):
        for (name, p), q in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6), name


# --- whole runs --------------------------------------------------------------------------------

def test_local_with_one_client_reproduces_main_centralized(cifar_root, tmp_path):
    common = [f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--BATCH_SIZE=50',
              '--lr2_milestones=(1,)', '--center_reg_fix=True', '--val_fraction=0.15']
    central = mc.main(common + ['--run_name=c', '--resn=8', '--n_centroids=4',
                                '--cold_start=True', '--EPOCHS=3', '--freeze_epoch=3',
                                '--lambda_coef=1e-3'])
    federated_run = mf.main(common + ['--run_name=f', '--algorithm=local', '--n_clients=1',
                                      '--classes_per_client=10', '--client_archs=(resnet8,)',
                                      '--client_bits=(2,)', '--rounds=3', '--freeze_round=3',
                                      '--lambda_coef=(1e-3,)'])
    pairs = {'train_loss': 'train_loss', 'train_acc': 'train_acc', 'test_acc': 'fp_test_acc',
             'val_acc': 'fp_val_acc', 'q_test_acc': 'q_test_acc', 'q_val_acc': 'q_val_acc',
             'q_train_loss': 'q_train_loss', 'centers': 'centers', 'members': 'members',
             'lr1': 'lr1'}
    central_rows, federated_rows = rows(central), rows(federated_run)
    assert len(central_rows) == len(federated_rows) == 3
    for c, f in zip(central_rows, federated_rows):
        client = f['clients'][0]
        assert {k: c[k] for k in pairs} == {k: client[v] for k, v in pairs.items()}
        assert [c[k] for k in ('lambda', 'lambda2', 'lr2', 'frozen')] == [
            f[k] for k in ('lambda', 'lambda2', 'lr2', 'frozen')]
    assert [row['frozen'] for row in central_rows] == [False, False, True]


def test_a_run_writes_its_partition_metrics_and_a_best_chosen_on_validation(cifar_root, tmp_path,
                                                                            capsys):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_bits=(1,0,2)', '--rounds=3'))
    out = capsys.readouterr().out
    assert out.count('round ') >= 3 and 'personalised quantized acc val' in out
    assert sorted(os.listdir(folder)) == ['.lock', 'best.pt', 'config.json', 'last.pt',
                                          'metrics.jsonl',
                                          'partition.json']
    with open(os.path.join(folder, 'partition.json')) as f:
        parts = json.load(f)
    cifar = data.load_cifar10(cifar_root, 'cpu')
    assert [p['client'] for p in parts] == [0, 1, 2, 3]
    for p in parts:
        assert not set(p['train_indices']) & set(p['val_indices'])
        for split, source in (('train', 'train_y'), ('val', 'train_y'), ('test', 'test_y')):
            assert p[f'{split}_class_counts'] == torch.bincount(
                cifar[source][p[f'{split}_indices']], minlength=10).tolist()
    metrics = rows(folder)
    for row in metrics:
        assert [c['client'] for c in row['clients']] == [0, 1, 2, 3]
        for split in ('val', 'test'):
            accs = [c[f'q_{split}_acc'] for c in row['clients']]
            weights = [c[f'n_{split}'] for c in row['clients']]
            assert row[f'q_{split}_acc_mean'] == pytest.approx(sum(accs) / 4)
            assert row[f'q_{split}_acc_weighted'] == pytest.approx(
                sum(a * w for a, w in zip(accs, weights)) / sum(weights))
            assert row[f'q_{split}_acc_min'] == min(accs) and row[f'q_{split}_acc_std'] >= 0
        assert row['global_test_acc_weighted'] is not None
        assert 0 < row['global_val_maxprob'] <= 1 and 0 <= row['global_val_entropy'] <= math.log(10)
        for c in row['clients']:  # over its own classes, the teacher can only do better
            assert c['global_val_acc_own'] >= c['global_val_acc']
            own = sum(n > 0 for n in parts[c['client']]['train_class_counts'])
            assert 0 <= c['global_val_entropy_own'] <= math.log(own) + 1e-6
        assert row['global_val_acc_own_mean'] == pytest.approx(
            sum(c['global_val_acc_own'] for c in row['clients']) / 4)
        assert [c['bits'] for c in row['clients']] == [1, 32, 2, 1]  # 0 bits: full precision
        assert [c['arch'] for c in row['clients']] == ['resnet8'] * 3 + ['cifarnet']
        sent = federated.model_bytes(resnet.build('resnet8'))
        assert row['bytes_down'] == row['bytes_up'] == 4 * sent
        assert all(c['bytes_down'] == c['bytes_up'] == sent for c in row['clients'])
    best = max(metrics, key=lambda row: row['q_val_acc_weighted'])  # first of equals
    for client in range(4):
        model, info = runs.load_client_model(os.path.join(folder, 'best.pt'), client)
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
    model, info = runs.load_client_model(os.path.join(folder, 'best.pt'), 2)
    assert info['arch'] == 'resnet8' and info['bits'] == 0


def test_fedavg_ft_fine_tunes_copies_and_leaves_the_global_model_as_fedavg_trains_it(cifar_root,
                                                                                   tmp_path):
    fedavg = rows(mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg', name='a')))
    tuned = rows(mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg_ft', name='b')))
    for plain, ft in zip(fedavg, tuned):
        assert [c['global_test_acc'] for c in plain['clients']] == [
            c['global_test_acc'] for c in ft['clients']]
        assert [c['q_test_acc'] for c in ft['clients']] != [
            c['global_test_acc'] for c in ft['clients']]
    best_a = torch.load(tmp_path / 'results' / 'a' / 'last.pt', weights_only=True)['global']
    best_b = torch.load(tmp_path / 'results' / 'b' / 'last.pt', weights_only=True)['global']
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_fedavg_qft_quantizes_copies_and_leaves_the_global_model_as_fedavg_trains_it(
        cifar_root, tmp_path):
    fedavg = rows(mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg', name='a')))
    folder = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=fedavg_qft',
                              '--client_bits=(1,2)', '--ft_epochs=1', name='b'))
    tuned = rows(folder)
    for plain, qft in zip(fedavg, tuned):
        assert [c['global_test_acc'] for c in plain['clients']] == [
            c['global_test_acc'] for c in qft['clients']]
        assert [c['bits'] for c in qft['clients']] == [1, 2, 1, 2]
        assert [len(c['centers'][0]) for c in qft['clients']] == [2, 4, 2, 4]
        assert all(c['arch'] == 'resnet8' for c in qft['clients'])
    a, b = (torch.load(tmp_path / 'results' / n / 'last.pt', weights_only=True)['global']
            for n in ('a', 'b'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, info = runs.load_client_model(os.path.join(folder, 'best.pt'), 1)
    assert info['bits'] == 2 and info['centers'].shape == (6, 4)
    names = torch.load(os.path.join(folder, 'best.pt'), weights_only=True)['clients'][1][
        'quantized_names']
    assert len(names) == 6 and all(len(torch.unique(model.state_dict()[n])) <= 4 for n in names)


def test_fedavg_qft_fine_tuning_is_algorithm_1_from_a_copy_of_the_global_model(cifar_root):
    """quantized_fine_tuned against Algorithm 1 written out: the batches of the fine-tuning's
    seed, Adam's step, then QuPeD's prox and center update after every step, with the round's
    schedule."""
    cfg, _ = federated.make_config(mf.DEFAULTS, [
        f'--data_root={cifar_root}', '--n_clients=2', '--classes_per_client=5',
        '--BATCH_SIZE=20', '--algorithm=fedavg_qft', '--client_archs=(resnet8,)',
        '--global_arch=resnet8', '--client_bits=(2,)', '--ft_epochs=2'])
    cifar = data.load_cifar10(cifar_root, 'cpu')
    dataset = federated.client_dataset(cifar, federated.make_partition(cfg, cifar)[1])
    torch.manual_seed(5)
    global_model = resnet.build('resnet8')
    before = copy.deepcopy(global_model.state_dict())
    rnd = 3
    state = federated.quantized_fine_tuned(cfg, 1, global_model, dataset, rnd)
    assert all(torch.equal(before[k], v) for k, v in global_model.state_dict().items())

    model = copy.deepcopy(global_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    weights = utils.QuantizedWeights(model, utils.resnet_rule(model))
    centers = utils.init_centers(weights, 4, adam=True)
    generator = torch.Generator().manual_seed(federated.fine_tune_seed(cfg, rnd, 1))
    lam = cfg['lambda_coef'][0] * (rnd + 1)
    model.train()
    for _ in range(2):
        for x, y in data.train_batches(dataset, 20, generator):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            utils.quped_update(weights, centers, x, y, lr1=1e-2, lr2=cfg['lr2'], lam=lam,
                               lam2=lam, l1=True, center_reg_fix=cfg['center_reg_fix'])
    assert torch.equal(state['centers'], centers)
    assert all(torch.equal(v, model.state_dict()[k])
               for k, v in state['model'].state_dict().items())


def test_client_sampling(cifar_root, tmp_path):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_fraction=0.5', '--rounds=3'))
    sampled = [row['sampled'] for row in rows(folder)]
    assert all(len(s) == 2 and s == sorted(s) for s in sampled)
    assert len({tuple(s) for s in sampled}) > 1
    for row in rows(folder):
        for client in row['clients']:
            assert client['sampled'] == (client['client'] in row['sampled'])
            assert ('train_loss' in client) == client['sampled']
            assert client['bytes_down'] == (client['bytes_up'] if client['sampled'] else 0)


def test_local_trains_every_client_every_round_whatever_the_fraction(cifar_root, tmp_path):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--client_fraction=0.5', '--algorithm=local'))
    for row in rows(folder):
        assert row['sampled'] == [0, 1, 2, 3] and row['bytes_down'] == row['bytes_up'] == 0
        assert row['global_test_acc_weighted'] is None


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('algorithm, extra', [('quped', ()), ('fedavg', ()),
                                              ('qupel', ('--global_optimizer_reset=False',))])
def test_resume_reproduces_an_uninterrupted_run(cifar_root, tmp_path, monkeypatch, algorithm,
                                                extra, device):
    args = ('--rounds=4', f'--algorithm={algorithm}', '--client_fraction=0.75',
            '--freeze_round=2', f'--device={device}', '--client_archs=(resnet8,)', *extra)
    whole = mf.main(fed_args(cifar_root, tmp_path, *args, name='whole'))
    assert [row['frozen'] for row in rows(whole)] == (
        [False, True, True, True] if algorithm != 'fedavg' else [False] * 4)
    for kill_after in (1, 3):  # before the freeze, and after it
        name = f'killed_after_{kill_after}'
        with monkeypatch.context() as patch:
            kill_after_round(patch, kill_after)
            with pytest.raises(Killed):
                mf.main(fed_args(cifar_root, tmp_path, *args, name=name))
        folder = tmp_path / 'results' / name
        shown = rows(folder) if (folder / 'metrics.jsonl').exists() else []
        assert len(shown) == kill_after - 1  # the kill came before the log
        mf.main([f'--resume={folder}'])
        assert without_timings(rows(folder)) == without_timings(rows(whole))
        assert_same_best(folder, whole)


@pytest.mark.parametrize('args, phrases', [
    (['--n_clients=100', '--classes_per_client=5'], ['of the 100 clients hold it']),
    (['--classes_per_client=0'], ['classes_per_client=0', '1 to 10']),
    (['--classes_per_client=11'], ['classes_per_client=11']),
    (['--client_archs=(resnet8,resnet9)'], ['resnet9', 'cifarnet2']),
    (['--global_arch=vgg'], ['vgg']),
    (['--algorithm=fedprox'], ["algorithm='fedprox'",
                               'quped, qupel, fedavg, fedavg_ft, fedavg_qft, local']),
    (['--partition=iid'], ["partition='iid'"]),
    (['--kd_form_center=exact'], ["kd_form_center='exact' is not one of '', released, hinton"]),
    (['--client_bits=(1,9)'], ['client_bits']),
    (['--client_fraction=0'], ['client_fraction=0.0']),
    (['--lambda_p=1.5'], ['lambda_p=1.5']),
    (['--dirichlet_alpha=0'], ['dirichlet_alpha=0.0']),
    (['--BATCH_SIZE=1'], ['two or more training images']),
    (['--val_fraction=0'], ['val_fraction=0.0']),
    (['--kd_form=exact'], ["kd_form='exact'"]),
    (['--lambda_coef=(1e-4,1e-5,1e-6)'], ['lambda_coef']),
    (['--algorithm=qupel'], ['qupel pulls', 'global_arch']),
    (['--algorithm=fedavg_ft', '--ft_epochs=0'], ['ft_epochs=0']),
    (['--algorithm=fedavg_qft', '--ft_epochs=0'], ['ft_epochs=0', 'fedavg_qft fine-tunes']),
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


def test_whole_runs_with_a_dirichlet_split_and_two_local_epochs(cifar_root, tmp_path,
                                                                monkeypatch):
    folder = mf.main(fed_args(cifar_root, tmp_path, '--partition=dirichlet',
                              '--dirichlet_alpha=0.3', name='dirichlet'))
    with open(os.path.join(folder, 'partition.json')) as f:
        parts = json.load(f)
    shares = [len(p['train_indices']) + len(p['val_indices']) for p in parts]
    assert max(shares) - min(shares) <= 1  # equal shares, as Hsu et al. draw them
    assert len({tuple(p['train_class_counts']) for p in parts}) == 4
    assert all(math.isfinite(c['train_loss']) for r in rows(folder) for c in r['clients'])
    steps = []
    real = utils.center_step
    monkeypatch.setattr(utils, 'center_step', lambda *a, **k: steps.append(1) or real(*a, **k))
    mf.main(fed_args(cifar_root, tmp_path, '--local_epochs=2', '--rounds=1',
                     '--client_bits=(1,)', name='two_epochs'))
    cifar = data.load_cifar10(cifar_root, 'cpu')
    cfg, _ = federated.make_config(mf.DEFAULTS, fed_args(cifar_root, tmp_path,
                                                         '--client_bits=(1,)'))
    batches = sum(data.batch_count(len(p['train_indices']), 20)
                  for p in federated.make_partition(cfg, cifar))
    assert len(steps) == 2 * batches


def test_the_defaults_are_the_validation_search_choices():
    """Each searched default is the setting of the search run (docs/results/search.json) with the
    best validation accuracy of its algorithm; the schedule is Algorithm 1's scaled to 150."""
    with open(ROOT / 'docs' / 'results' / 'search.json') as f:
        runs = json.load(f)

    def best(algorithm, **fixed):
        mine = [r for r in runs if r['config']['algorithm'] == algorithm
                and all(r['config'][k] == v for k, v in fixed.items())]
        return max(mine, key=lambda r: r['best_q_val_acc_weighted'])['config']

    d = mf.DEFAULTS
    quped = best('quped')
    for name in ('kd_form', 'lambda_p', 'global_lambda_p', 'temp'):
        assert d[name] == quped[name], name
    assert list(d['lambda_coef']) == quped['lambda_coef'] == best('local')['lambda_coef']
    assert d['global_lr'] == best('fedavg', client_archs=['cifarnet'])['global_lr']
    assert d['lambda_p'] == best('qupel')['lambda_p']
    assert (d['client_archs'], d['global_arch']) == (tuple(quped['client_archs']),
                                                     quped['global_arch'])
    assert (d['rounds'], d['lr2_milestones'], d['freeze_round']) == (
        quped['rounds'], tuple(quped['lr2_milestones']), quped['freeze_round']) == (
        150, (round(80 * 150 / 250), round(140 * 150 / 250)), round(200 * 150 / 250))
    assert d['center_reg_fix'] is True


def equal_budget_choice(method):
    """The setting the equal-budget search chose for `method`, checked against its runs'
    validation accuracies, and how many settings it was chosen from."""
    with open(ROOT / 'docs' / 'results' / 'search_equal' / f'search_equal_{method}' /
              'summary.json') as f:
        summary = json.load(f)
    chosen, = summary['chosen_on_validation']
    best = max(summary['settings'], key=lambda e: e['selected_validation']['mean'])
    assert chosen['setting'] == best['setting']
    return {name: runtime.parse_value(mf.DEFAULTS, name, text)
            for name, text in chosen['setting'].items()}, chosen['tried']


def test_the_defaults_hold_the_equal_budget_search_choices():
    """docs/results/search_equal: four settings each; QuPeD's center step follows kd_form
    (Hinton's), local training keeps lambda_coef 1e-3 and QuPeL lambda_p 0.1; both fine-tuning
    baselines fine-tune two epochs, FedAvg-FT at lr 0.003."""
    d = mf.DEFAULTS
    quped, tried = equal_budget_choice('quped')
    assert tried == 4 and quped == {'kd_form_center': 'hinton', 'lambda_p': d['lambda_p']}
    assert d['kd_form_center'] == '' and federated.center_kd_form(d) == 'hinton'
    local, tried = equal_budget_choice('local')
    assert tried == 4 and local == {'lambda_coef': d['lambda_coef']}
    qupel, tried = equal_budget_choice('qupel')
    assert tried == 4 and qupel == {'lambda_p': d['lambda_p']}
    fine_tuned, tried = equal_budget_choice('fedavg_ft')
    assert tried == 4 and fine_tuned == {'ft_lr': d['ft_lr'], 'ft_epochs': d['ft_epochs']}
    quantized, tried = equal_budget_choice('fedavg_qft')
    assert tried == 4 and quantized == {'lambda_coef': d['lambda_coef'],
                                        'ft_epochs': d['ft_epochs']}


class FixedLogits(torch.nn.Module):
    """A model whose logits are given, one row per image (the images themselves unused)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer('logits', torch.tensor(logits))

    def forward(self, x):
        return self.logits[:x.shape[0]]


def test_the_teachers_scores_over_the_clients_own_classes_equal_a_hand_computation():
    logits = [[0.0, 1.0, 3.0] + [0.0] * 7,   # label 2: 10-way right, own classes (1, 2) right
              [5.0, 0.0, 2.0] + [0.0] * 7]   # label 1: 10-way wrong (0), own classes wrong (2)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([2, 1])
    scores = federated.teacher_scores(FixedLogits(logits), images, labels, torch.tensor([1, 2]))

    def entropy(values):
        p = [math.exp(v) / sum(math.exp(u) for u in values) for v in values]
        return -sum(q * math.log(q) for q in p), max(p)
    ten = [entropy(row) for row in logits]
    own = [entropy([row[1], row[2]]) for row in logits]
    assert scores['global_val_acc_own'] == 0.5
    assert scores['global_val_entropy'] == pytest.approx((ten[0][0] + ten[1][0]) / 2, rel=1e-6)
    assert scores['global_val_maxprob'] == pytest.approx((ten[0][1] + ten[1][1]) / 2, rel=1e-6)
    assert scores['global_val_entropy_own'] == pytest.approx((own[0][0] + own[1][0]) / 2,
                                                             rel=1e-6)
    dataset = {'train_y': torch.tensor([7, 3, 3, 7, 0])}
    assert federated.own_classes(dataset).tolist() == [0, 3, 7]


def test_central_trains_the_global_model_alone_on_the_union_of_the_clients_training_images(
        cifar_root, tmp_path):
    """central against SGD written out: the same initialisation, one epoch a round over every
    client's training images (none of their validation or test images), batches from the
    global seed's generator, the optimizer kept across rounds; no client trains."""
    folder = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=central', '--rounds=2'))
    metrics = rows(folder)
    assert all(row['sampled'] == [] and row['bytes_down'] == row['bytes_up'] == 0
               for row in metrics)
    cfg = json.load(open(os.path.join(folder, 'config.json')))
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    cifar = data.load_cifar10(cifar_root, 'cpu')
    parts = json.load(open(os.path.join(folder, 'partition.json')))
    train = sorted(i for p in parts for i in p['train_indices'])
    held_out = {i for p in parts for i in p['val_indices']}
    assert not held_out & set(train)
    union = federated.union_dataset(cifar, parts)
    assert sorted(union['train_y'].tolist()) == sorted(cifar['train_y'][train].tolist())
    torch.manual_seed(cfg['seed'] + federated.GLOBAL_SEED_OFFSET)
    model = resnet.build('resnet8')
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg['global_lr'],
                                momentum=cfg['global_momentum'])
    generator = torch.Generator().manual_seed(cfg['seed'] + federated.GLOBAL_SEED_OFFSET)
    model.train()
    for _ in range(2):
        for x, y in data.train_batches(union, cfg['BATCH_SIZE'], generator):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    saved = torch.load(os.path.join(folder, 'last.pt'), weights_only=True)['global']
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_killed_central_run_resumes_to_the_uninterrupted_one(cifar_root, tmp_path,
                                                               monkeypatch):
    args = ['--algorithm=central', '--rounds=3']
    with monkeypatch.context() as patch:
        kill_after_round(patch, 1)
        with pytest.raises(Killed):
            mf.main(fed_args(cifar_root, tmp_path, *args, name='killed'))
    folder = mf.main([f'--resume={tmp_path / "results" / "killed"}'])
    whole = mf.main(fed_args(cifar_root, tmp_path, *args, name='whole'))
    assert without_timings(rows(folder)) == without_timings(rows(whole))
    assert_same_best(folder, whole)


def test_the_global_model_warm_starts_from_a_central_runs_best(cifar_root, tmp_path, capsys):
    teacher = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=central', name='teacher'))
    best = torch.load(os.path.join(teacher, 'best.pt'), weights_only=True)['global']['state_dict']
    capsys.readouterr()
    student = fed_args(cifar_root, tmp_path, '--algorithm=quped',
                       f'--global_pretrained={teacher}/best.pt', name='student')
    cfg, _ = federated.make_config(mf.DEFAULTS, student)
    started = federated.new_global_model(cfg, 'cpu').state_dict()
    assert all(torch.equal(started[k], v) for k, v in best.items())
    mf.main(student)
    assert f'global model: warm-started from {teacher}/best.pt (sha256 ' in capsys.readouterr().out
    mf.main(fed_args(cifar_root, tmp_path, '--algorithm=local', '--rounds=1',
                     f'--global_pretrained={teacher}/best.pt', name='x'))  # as in a sweep
    assert 'not used, local has no global model' in capsys.readouterr().out
    other = fed_args(cifar_root, tmp_path, '--algorithm=fedavg', '--global_arch=cifarnet',
                     f'--global_pretrained={teacher}/best.pt', name='y')
    fails_with(capsys, other, 'a resnet8 global model', 'global_arch is cifarnet')


def test_an_algorithm_added_as_one_record_runs_end_to_end(cifar_root, tmp_path, monkeypatch):
    """A toy baseline, one entry of federated.ALGORITHMS and nothing else: FedAvg whose clients
    take no step (the global model stays at its initialisation). The run, its checks, rows,
    line, best.pt and plot all take it from the record."""
    import plot

    def no_step(cfg, state, global_copy, dataset, sched):
        return {'global_train_loss': 0.0, 'train_acc': 0.0}
    monkeypatch.setitem(federated.ALGORITHMS, 'frozen_global',
                        federated.Algorithm('untrained global model', no_step))
    folder = mf.main(fed_args(cifar_root, tmp_path, '--algorithm=frozen_global'))
    metrics = rows(folder)
    assert len(metrics) == 2 and metrics[0]['sampled'] == [0, 1, 2, 3]
    assert [c['q_test_acc'] for c in metrics[0]['clients']] == [
        c['q_test_acc'] for c in metrics[1]['clients']]  # nothing learnt
    cfg, _ = federated.make_config(mf.DEFAULTS, fed_args(cifar_root, tmp_path,
                                                         '--algorithm=frozen_global'))
    initial = federated.new_global_model(cfg, 'cpu').state_dict()
    saved = torch.load(os.path.join(folder, 'last.pt'), weights_only=True)['global']
    # the average of equal copies, up to the rounding of the weighted sum
    assert all(torch.allclose(saved[k].double(), v.double(), rtol=1e-6, atol=1e-7)
               for k, v in initial.items())
    assert plot.model_label({'algorithm': 'frozen_global'}) == 'untrained global model'
    assert plot.plot_run(folder)


# --- warm starts of the models -------------------------------------------------------------------

def test_a_federated_warm_start_that_fits_no_model_is_an_error(cifar_root, tmp_path, capsys):
    torch.save(resnet.build('resnet20').state_dict(), tmp_path / 'r20.pt')
    exits_with_error(capsys, mf.main, cnn_fed_args(cifar_root, tmp_path, '--cold_start=False',
                                               f'--pretrained_path={tmp_path}/r20.pt'),
                     'is a resnet20', 'cifarnet', '--cold_start=True')
    assert not (tmp_path / 'results').exists()


def test_a_federated_warm_start_says_which_models_it_loads(cifar_root, tmp_path, capsys):
    torch.save(resnet.build('cifarnet').state_dict(), tmp_path / 'cnet.pt')
    mf.main(cnn_fed_args(cifar_root, tmp_path, '--cold_start=False', '--rounds=1',
                     f'--pretrained_path={tmp_path}/cnet.pt'))
    assert f'every cifarnet warm-started from {tmp_path}/cnet.pt' in capsys.readouterr().out


# --- configuration errors ------------------------------------------------------------------------

def test_a_dirichlet_split_with_too_many_clients_does_not_blame_the_batch_size(
        cifar_root, tmp_path, capsys):
    message = exits_with_error(capsys, mf.main, cnn_fed_args(
        cifar_root, tmp_path, '--partition=dirichlet', '--n_clients=150'), 'validation image')
    assert 'BATCH_SIZE' not in message
