"""QuPeD, federated (Ozkara et al., NeurIPS 2021): every client learns its own quantized,
personalised model by knowledge distillation (KD) from a global model trained with FedAvg, in
one process (an in-process simulation of the clients and the server).

Edit the hyperparameters below and run `python main_federated.py`, or override any of them:
    python main_federated.py --n_clients=20 '--client_bits=(1,2)' '--client_archs=(resnet8,)'
Each run writes its logs, partition and checkpoints to {results_dir}/{run_name}/ (README.md,
"Federated"). `--resume=Results/<run>` continues a killed run.

The released code defines only the center step's KD loss (utils.kd_loss, tested against the
authors' golden vectors); the rest of each round is this project's reading of the paper, each
uncertain choice a hyperparameter (README.md, "Federated: what is the authors' and what is ours").
"""
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import data
import resnet
import runtime
import training
import utils

# ---------------------------------------------------------------------------------------------
# Hyperparameters. Where the paper's federated settings could not be read, these are our choices.
algorithm = 'quped'            # 'quped'; 'fedavg': the global model only; 'local': each client
                               # runs Algorithm 1 alone, no communication
n_clients = 20                 # clients in the federation
client_fraction = 1.0          # share of the clients sampled each round
rounds = 250                   # communication rounds
local_epochs = 1               # epochs over its own data a sampled client runs per round
BATCH_SIZE = 50                # clients' batch size
partition = 'pathological'     # 'pathological' (classes_per_client classes each) or 'dirichlet'
classes_per_client = 3         # pathological: classes per client, 1..10
dirichlet_alpha = 0.5          # dirichlet: label concentration (small: few classes per client)
client_bits = (1, 2)           # personalised models' bits, given to clients in turn (n = 2**bits
                               # centers); 0 = full precision, no quantization
client_archs = ('resnet20',)   # personalised models' architectures, in turn: resnet8/20/32/...,
                               # cifarnet, cifarnet2
global_arch = 'resnet20'       # the global (FedAvg) model's architecture
lambda_p = 0.5                 # KD weight: (1 - lambda_p) CE + lambda_p T^2 KL
temp = 2.0                     # KD temperature T (divides the teacher's logits only, quirk 8)
kd_scale_student = False       # True: divide the student's logits by T too (Hinton's form)
global_kd = True               # the global copy's local step distils from the personalised
                               # model (False: plain cross-entropy, FedAvg's local step)
global_lr = 0.1                # the global copy's local SGD learning rate
global_momentum = 0.9          # its momentum (the optimizer starts afresh every round)
weight_decay = 0.0             # its weight decay
lambda_coef = 1e-4             # prox strength: lambda = lambda_coef * round
l1 = True                      # L1 prox and center regulariser (False: L2)
lr2 = 1e-4                     # center learning rate
lr2_milestones = (80, 140)     # rounds (0-based) from which lr2 is divided by 10, then by 100
freeze_round = 200             # hard-quantize and freeze the personalised models' quantized
                               # layers at the start of round freeze_round (1-based)
center_reg_fix = True          # descent sign for the L1 center regulariser (quirk 1 fixed)
cold_start = True              # False: every model of pretrained_path's architecture starts there
pretrained_path = ''           # a full-precision checkpoint, for cold_start=False
seed = 1234                    # seeds the partition, initialisation, sampling and batches
data_root = 'data'             # folder holding cifar-10-batches-py/ (downloaded when absent)
results_dir = 'Results'        # each run writes to results_dir/run_name/
run_name = ''                  # '' = fed_<algorithm>_<clients>c_<partition>_<date-time>
device = 'auto'                # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'
tf32 = False                   # CUDA: TF32 convolutions and matmuls (not the authors' fp32)
resume = ''                    # a run folder: continue that run from its last.pt
# ---------------------------------------------------------------------------------------------
DEFAULTS = runtime.hyperparameters(globals())

ALGORITHMS = ('quped', 'fedavg', 'local')
PARTITIONS = ('pathological', 'dirichlet')
RESUMABLE = {'rounds', 'device', 'resume'}  # may change when a run is resumed
SCRIPT = 'main_federated.py'
ConfigError = runtime.ConfigError
QUANTIZATION_RULES = {'cifarnet': utils.cnet_rule, 'cifarnet2': utils.cnet_rule}  # else ResNet


# --- configuration ---------------------------------------------------------------------------

def check_config(cfg):
    """Raise ConfigError for values the run cannot use."""
    problems = []
    for name, allowed in (('algorithm', ALGORITHMS), ('partition', PARTITIONS)):
        if cfg[name] not in allowed:
            problems.append(f"{name}={cfg[name]!r} is not one of {', '.join(allowed)}")
    for name in ('n_clients', 'rounds', 'local_epochs', 'BATCH_SIZE', 'freeze_round'):
        if cfg[name] < 1:
            problems.append(f"{name}={cfg[name]}: must be at least 1")
    if not 1 <= cfg['classes_per_client'] <= data.NUM_CLASSES:
        problems.append(f"classes_per_client={cfg['classes_per_client']}: a client holds 1 to "
                        f"{data.NUM_CLASSES} classes")
    if not cfg['dirichlet_alpha'] > 0:
        problems.append(f"dirichlet_alpha={cfg['dirichlet_alpha']}: must be positive")
    if not 0 < cfg['client_fraction'] <= 1:
        problems.append(f"client_fraction={cfg['client_fraction']}: must be in (0, 1]")
    if not cfg['client_bits'] or any(not 0 <= b <= 8 for b in cfg['client_bits']):
        problems.append(f"client_bits={cfg['client_bits']}: give each 0 (full precision) to 8")
    archs = list(cfg['client_archs']) + [cfg['global_arch']]
    unknown = sorted({a for a in archs if a not in resnet.ARCHS})
    if unknown or not cfg['client_archs']:
        problems.append(f"unknown or missing architecture {', '.join(unknown) or '()'}: choose "
                        f"from {', '.join(resnet.ARCHS)}")
    if not 0 <= cfg['lambda_p'] <= 1:
        problems.append(f"lambda_p={cfg['lambda_p']}: the KD weight must be in [0, 1]")
    for name in ('temp', 'global_lr'):
        if not (cfg[name] > 0 and math.isfinite(cfg[name])):
            problems.append(f"{name}={cfg[name]}: must be a finite number > 0")
    for name in ('lambda_coef', 'lr2', 'weight_decay'):
        if not (cfg[name] >= 0 and math.isfinite(cfg[name])):
            problems.append(f"{name}={cfg[name]}: must be a finite number >= 0")
    if not 0 <= cfg['global_momentum'] < 1:
        problems.append(f"global_momentum={cfg['global_momentum']}: must be in [0, 1)")
    if list(cfg['lr2_milestones']) != sorted(set(cfg['lr2_milestones'])) or any(
            m < 1 for m in cfg['lr2_milestones']):
        problems.append(f"lr2_milestones={cfg['lr2_milestones']}: must be increasing positive "
                        f"rounds")
    if not cfg['cold_start'] and not cfg['pretrained_path']:
        problems.append("cold_start=False needs a pretrained_path")
    if problems:
        raise ConfigError('; '.join(problems) + '. Fix these hyperparameters and run again.')


def make_config(argv):
    """(configuration, the overrides it came from) for command-line arguments `argv`."""
    overrides = runtime.parse_overrides(DEFAULTS, argv)
    cfg = {**DEFAULTS, **overrides}
    check_config(cfg)
    return cfg, overrides


def client_plan(cfg, client):
    """(architecture, bits) of a client's personalised model: the lists taken in turn."""
    return (cfg['client_archs'][client % len(cfg['client_archs'])],
            cfg['client_bits'][client % len(cfg['client_bits'])])


def round_schedule(cfg, rnd):
    """Algorithm 1's schedule, per round (training.schedule)."""
    return training.schedule(rnd, cfg['lambda_coef'], cfg['lr2'], cfg['lr2_milestones'],
                             cfg['freeze_round'])


# --- data ------------------------------------------------------------------------------------

def make_partition(cfg, cifar):
    """[{client, train_indices, test_indices, train_class_counts, test_class_counts}]."""
    labels = cifar['train_y']
    if cfg['partition'] == 'pathological':
        train = data.pathological_partition(labels, cfg['n_clients'], cfg['classes_per_client'],
                                            cfg['seed'])
    else:
        train = data.dirichlet_partition(labels, cfg['n_clients'], cfg['dirichlet_alpha'],
                                         cfg['seed'])
    train_counts = data.class_counts(labels, train)
    test = data.test_partition(cifar['test_y'], train_counts, cfg['seed'])
    test_counts = data.class_counts(cifar['test_y'], test)
    for client, (tr, te) in enumerate(zip(train, test)):
        if min(cfg['BATCH_SIZE'], tr.numel()) < 2 or te.numel() == 0:
            raise ConfigError(
                f"client {client} gets {tr.numel()} training and {te.numel()} test images with "
                f"this partition; each client needs a batch of two or more training images "
                f"(BatchNorm cannot train on one) and a test image: use fewer clients, another "
                f"partition, or a BATCH_SIZE of 2 or more.")
    return [{'client': i, 'train_indices': tr.tolist(), 'test_indices': te.tolist(),
             'train_class_counts': trc.tolist(), 'test_class_counts': tec.tolist()}
            for i, (tr, te, trc, tec) in enumerate(zip(train, test, train_counts, test_counts))]


def client_data(cifar, parts):
    return data.client_datasets(cifar, [torch.tensor(p['train_indices']) for p in parts],
                                [torch.tensor(p['test_indices']) for p in parts])


# --- models ----------------------------------------------------------------------------------

def build_model(cfg, arch, dev):
    model = resnet.build(arch)
    if not cfg['cold_start'] and resnet.guess_arch(resnet.read_state_dict(
            cfg['pretrained_path'])) == arch:
        resnet.load_checkpoint(model, cfg['pretrained_path'], arch)
    return model.to(dev)


def personal_state(cfg, client, dev):
    """A client's personalised model and its Algorithm 1 state (Adam, centers, batches)."""
    arch, bits = client_plan(cfg, client)
    model = build_model(cfg, arch, dev)
    optimizer, scheduler = training.build_optimizer(model, adam=True)
    generator = runtime.device_generator(cfg['seed'] + client, dev)
    names = QUANTIZATION_RULES.get(arch, utils.resnet_rule)(model)
    return training.new_state(model, 2 ** bits if bits else 0, optimizer, scheduler, generator,
                              adam_centers=True, names=names, l1=cfg['l1'])


def initial_states(cfg, dev):
    """The clients' states (personalised models first, so that client 0's initialisation is
    main_centralized.py's for the same seed) and the global model (None for 'local')."""
    runtime.seed_everything(cfg['seed'], dev)
    clients = []
    for client in range(cfg['n_clients']):
        if cfg['algorithm'] == 'fedavg':
            clients.append({'generator': runtime.device_generator(cfg['seed'] + client, dev)})
        else:
            clients.append(personal_state(cfg, client, dev))
    global_model = None if cfg['algorithm'] == 'local' else build_model(cfg, cfg['global_arch'],
                                                                        dev)
    return clients, global_model


# --- one client's round ----------------------------------------------------------------------

def quped_client_step(cfg, state, global_copy, global_optimizer, x, y, sched, lr1):
    """QuPeD's client iteration on one batch:
    (a) a step of the personalised model x_i on the KD loss towards the global copy w_i, then
        Algorithm 1's prox step;
    (b) Algorithm 1's center step with the KD loss through Q_c(x_i);
    (c) a step of w_i on the KD loss towards Q_c(x_i)'s logits from (b) (cross-entropy when
        global_kd is False).
    One forward of w_i serves as the teacher of (a) and (b) and as the graph of (c), so the
    iteration runs three forward/backward passes; every teacher is detached. Returns the
    detached (personal loss, personal logits, global loss, member counts or None)."""
    model, optimizer, weights, centers = (state[k] for k in ('model', 'optimizer', 'weights',
                                                             'centers'))
    kd = {'lambda_p': cfg['lambda_p'], 'temp': cfg['temp'],
          'scale_student': cfg['kd_scale_student']}
    global_logits = global_copy(x)
    teacher = global_logits.detach()
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = utils.kd_loss(logits, y, teacher, **kd)
    loss.backward()
    optimizer.step()
    personal_logits, members = logits.detach(), None
    if weights is not None:
        utils.prox_step(weights, centers, lr1, sched['lam'], l1=cfg['l1'], lr2=sched['lr2'])
        members, personal_logits = utils.center_step(
            weights, centers, x, y, sched['lr2'], sched['lam2'], l1=cfg['l1'],
            center_reg_fix=cfg['center_reg_fix'],
            loss_fn=lambda out, labels: utils.kd_loss(out, labels, teacher, **kd))
    global_optimizer.zero_grad(set_to_none=True)
    global_loss = (utils.kd_loss(global_logits, y, personal_logits, **kd) if cfg['global_kd']
                   else F.cross_entropy(global_logits, y))
    global_loss.backward()
    global_optimizer.step()
    return loss.detach(), logits.detach(), global_loss.detach(), members


def global_optimizer_for(cfg, global_copy):
    """The global copy's local optimizer, new every round: FedAvg's clients keep no state."""
    return torch.optim.SGD(global_copy.parameters(), lr=cfg['global_lr'],
                           momentum=cfg['global_momentum'], weight_decay=cfg['weight_decay'])


def quped_client_update(cfg, state, global_copy, dataset, sched):
    """`local_epochs` of QuPeD's client iteration (quped_client_step) over the client's data;
    returns the client's training metrics."""
    global_optimizer = global_optimizer_for(cfg, global_copy)
    lr1 = state['optimizer'].param_groups[0]['lr']
    state['model'].train()
    global_copy.train()
    sums = torch.zeros(3, device=dataset['train_y'].device)  # loss, correct, global loss
    seen, members = 0, None
    for _ in range(cfg['local_epochs']):
        for x, y in data.train_batches(dataset, cfg['BATCH_SIZE'], state['generator']):
            loss, logits, global_loss, step_members = quped_client_step(
                cfg, state, global_copy, global_optimizer, x, y, sched, lr1)
            members = step_members if step_members is not None else members
            sums += torch.stack([loss * y.shape[0], (logits.argmax(1) == y).sum(),
                                 global_loss * y.shape[0]])
            seen += y.shape[0]
    loss_sum, correct, global_loss_sum = sums.tolist()
    return {'train_loss': loss_sum / seen, 'train_acc': correct / seen,
            'global_train_loss': global_loss_sum / seen, 'lr1': lr1,
            'members': None if members is None else members.long().tolist()}


def fedavg_client_update(cfg, state, global_copy, dataset):
    """FedAvg's local step: `local_epochs` of plain cross-entropy SGD on the global copy."""
    optimizer = global_optimizer_for(cfg, global_copy)
    global_copy.train()
    sums = torch.zeros(2, device=dataset['train_y'].device)
    seen = 0
    for _ in range(cfg['local_epochs']):
        for x, y in data.train_batches(dataset, cfg['BATCH_SIZE'], state['generator']):
            optimizer.zero_grad(set_to_none=True)
            logits = global_copy(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach() * y.shape[0], (logits.argmax(1) == y).sum()])
            seen += y.shape[0]
    loss_sum, correct = sums.tolist()
    return {'global_train_loss': loss_sum / seen, 'train_acc': correct / seen}


def local_client_update(cfg, state, dataset, sched):
    """Algorithm 1 alone on the client's data, `local_epochs` epochs (training.train_epoch, as
    main_centralized.py runs it)."""
    training.start_epoch(state, sched)
    epochs = [training.train_epoch(state, dataset, cfg['BATCH_SIZE'], sched, cfg['center_reg_fix'])
              for _ in range(cfg['local_epochs'])]
    members = epochs[-1][2]
    return {'train_loss': statistics.fmean(e[0] for e in epochs),
            'train_acc': statistics.fmean(e[1] for e in epochs), 'lr1': epochs[-1][3],
            'members': None if members is None else members.long().tolist()}


def client_round(cfg, state, global_state, global_copy, dataset, sched):
    """One client's round: w_i <- the global model, local training; returns (w_i's state after
    it, the client's sample count, its training metrics). The unit an engine would run on a
    client."""
    if global_copy is not None:
        global_copy.load_state_dict(global_state)
    if cfg['algorithm'] == 'fedavg':
        metrics = fedavg_client_update(cfg, state, global_copy, dataset)
    elif cfg['algorithm'] == 'quped':
        training.start_epoch(state, sched)
        metrics = quped_client_update(cfg, state, global_copy, dataset, sched)
    else:
        metrics = local_client_update(cfg, state, dataset, sched)
    new_state = None if global_copy is None else {k: v.detach().clone() for k, v in
                                                  global_copy.state_dict().items()}
    return new_state, dataset['train_y'].shape[0], metrics


@torch.no_grad()
def aggregate(states, counts):
    """FedAvg: the clients' global copies averaged with weights n_i / sum n. Parameters and
    BatchNorm buffers alike (running statistics too: the global model is evaluated with them);
    integer buffers (BatchNorm's step counter) get the weighted mean rounded down. The unit an
    engine would run on the server."""
    total = sum(counts)
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = sum((n / total) * s[key] for s, n in zip(states, counts))
        else:
            averaged[key] = sum(n * s[key] for s, n in zip(states, counts)) // total
    return averaged


def sample_clients(cfg, sampler):
    """The clients of this round: all, or max(1, round(fraction * n)) drawn without
    replacement, in increasing order."""
    m = max(1, round(cfg['client_fraction'] * cfg['n_clients']))
    if m == cfg['n_clients']:
        return list(range(m))
    return sorted(torch.randperm(cfg['n_clients'], generator=sampler)[:m].tolist())


# --- evaluation and metrics --------------------------------------------------------------------

def evaluate_client(cfg, state, global_model, dataset):
    """The client's personalised accuracies (quantized and full precision) and the global
    model's, on its own test images."""
    out = {}
    if global_model is not None:
        _, out['global_test_acc'] = runtime.evaluate(global_model, dataset['test_x'],
                                                     dataset['test_y'])
    if cfg['algorithm'] == 'fedavg':
        return {**out, 'q_test_acc': out['global_test_acc'],
                'fp_test_acc': out['global_test_acc']}
    evaluation = training.evaluate_state(state, dataset)
    return {'global_test_acc': None, **out, 'q_test_acc': evaluation['q_test_acc'],
            'fp_test_acc': evaluation['test_acc'], 'q_train_loss': evaluation['q_train_loss'],
            'centers': None if state['centers'] is None else state['centers'].tolist()}


def summary(values, weights):
    """Sample-weighted mean, mean, std and min of per-client values (None if there are none)."""
    if any(v is None for v in values):
        return {'weighted': None, 'mean': None, 'std': None, 'min': None}
    return {'weighted': sum(v * w for v, w in zip(values, weights)) / sum(weights),
            'mean': statistics.fmean(values), 'std': statistics.pstdev(values),
            'min': min(values)}


def round_row(cfg, rnd, sched, clients_metrics, timings):
    row = {'round': rnd + 1, 'clients': clients_metrics}
    weights = [c['n_test'] for c in clients_metrics]
    for key in ('q_test_acc', 'fp_test_acc', 'global_test_acc'):
        for stat, value in summary([c[key] for c in clients_metrics], weights).items():
            row[f'{key}_{stat}'] = value
    return {**row, 'lambda': sched['lam'], 'lambda2': sched['lam2'],
            'lr1': None if cfg['algorithm'] == 'fedavg' else training.ADAM_LR, 'lr2': sched['lr2'],
            'global_lr': None if cfg['algorithm'] == 'local' else cfg['global_lr'],
            'frozen': sched['frozen'],
            'sampled': [c['client'] for c in clients_metrics if c['sampled']], **timings,
            'wall_seconds': timings['train_seconds'] + timings['eval_seconds']}


def round_line(row, rounds, left):
    global_acc = ('' if row['global_test_acc_mean'] is None else
                  f" | global model {row['global_test_acc_mean']:.4f}")
    return (f"round {row['round']:3d}/{rounds} | personalised quantized test acc mean "
            f"{row['q_test_acc_mean']:.4f} min {row['q_test_acc_min']:.4f} (full precision "
            f"{row['fp_test_acc_mean']:.4f}){global_acc} | lambda {row['lambda']:.1e} lr2 "
            f"{row['lr2']:.0e} | {len(row['sampled'])} clients {row['train_seconds']:.1f}s + "
            f"{row['eval_seconds']:.1f}s | {left}")


# --- one round ---------------------------------------------------------------------------------

def run_round(cfg, run, rnd):
    """Sample, train the sampled clients, aggregate, evaluate every client; the round's row."""
    sched = round_schedule(cfg, rnd)
    clients, global_model, datasets = run['clients'], run['global_model'], run['datasets']
    sampled = sample_clients(cfg, run['sampler'])
    global_state = None if global_model is None else {
        k: v.detach().clone() for k, v in global_model.state_dict().items()}
    start = time.perf_counter()
    trained, metrics = [], {}
    for client in sampled:
        new_state, count, metrics[client] = client_round(
            cfg, clients[client], global_state, run['global_copy'], datasets[client], sched)
        if new_state is not None:
            trained.append((new_state, count))
    if trained:
        global_model.load_state_dict(aggregate(*zip(*trained)))
    training.synchronize(datasets[0]['train_y'].device)
    mid = time.perf_counter()
    clients_metrics = []
    for client, dataset in enumerate(datasets):
        arch, bits = client_plan(cfg, client)
        entry = {'client': client, 'arch': cfg['global_arch'] if cfg['algorithm'] == 'fedavg'
                 else arch, 'bits': 32 if cfg['algorithm'] == 'fedavg' or not bits else bits,
                 'n_train': dataset['train_y'].shape[0], 'n_test': dataset['test_y'].shape[0],
                 'sampled': client in metrics, **metrics.get(client, {}),
                 **evaluate_client(cfg, clients[client], global_model, dataset)}
        finite = (entry.get('train_loss', 0.0), entry.get('global_train_loss', 0.0),
                  sum(map(sum, entry.get('centers') or [])))
        if not all(math.isfinite(v) for v in finite):
            raise runtime.Diverged
        clients_metrics.append(entry)
    timings = {'train_seconds': mid - start, 'eval_seconds': time.perf_counter() - mid}
    return round_row(cfg, rnd, sched, clients_metrics, timings)


# --- outputs -----------------------------------------------------------------------------------

def default_run_name(cfg):
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f"fed_{cfg['algorithm']}_{cfg['n_clients']}c_{cfg['partition']}_{stamp}"


def quantized_model_state(state):
    """A personalised model's state_dict on the CPU, Q_c(x) in its quantized layers."""
    saved = {k: v.detach().cpu().clone() for k, v in state['model'].state_dict().items()}
    if state['weights'] is not None:
        saved.update({k: v.cpu() for k, v in
                      utils.quantized_state(state['weights'], state['centers'],
                                            state['l1']).items()})
    return saved


def save_best(cfg, run, folder, row):
    """best.pt when the clients' mean personalised quantized test accuracy improves (strictly):
    every client's quantized model and centers, and the global model."""
    if row['q_test_acc_mean'] <= run['best']:
        return
    run['best'] = row['q_test_acc_mean']
    clients = []
    if cfg['algorithm'] != 'fedavg':
        for client, state in enumerate(run['clients']):
            arch, bits = client_plan(cfg, client)
            clients.append({'client': client, 'arch': arch, 'bits': bits,
                            'state_dict': quantized_model_state(state),
                            'centers': None if state['centers'] is None else state['centers'].cpu(),
                            'quantized_names': None if state['weights'] is None
                            else state['weights'].names})
    global_model = run['global_model']
    runtime.save_torch(os.path.join(folder, 'best.pt'), {
        'config': cfg, 'round': row['round'], 'metrics': row, 'clients': clients,
        'global': None if global_model is None else {
            'arch': cfg['global_arch'],
            'state_dict': {k: v.cpu() for k, v in global_model.state_dict().items()}}})


def save_last(cfg, run, folder, rows):
    """Everything a resumed run needs, written after best.pt and before the logs."""
    clients = [training.saved_state(s) if 'model' in s else
               {'generator': s['generator'].get_state()} for s in run['clients']]
    runtime.save_torch(os.path.join(folder, 'last.pt'), {
        'config': cfg, 'round': len(rows), 'rows': rows, 'clients': clients,
        'global': None if run['global_model'] is None else run['global_model'].state_dict(),
        **runtime.rng_states(run['sampler']), 'best': run['best']})


def restore(run, checkpoint):
    for state, saved in zip(run['clients'], checkpoint['clients']):
        if 'model' in state:
            training.load_state(state, saved)
        else:
            state['generator'].set_state(saved['generator'])
    if run['global_model'] is not None:
        run['global_model'].load_state_dict(checkpoint['global'])
    runtime.restore_rng_states(checkpoint, run['sampler'])
    run['best'] = checkpoint['best']


def load_client_model(path, client, device='cpu'):
    """Client `client`'s quantized personalised model from a best.pt, ready (eval mode), and
    {'round', 'metrics', 'config', 'arch', 'bits', 'centers'}. For a FedAvg run, whose clients
    have no model of their own, the global model."""
    checkpoint = resnet.read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {'clients', 'global', 'round'} <= set(checkpoint):
        raise resnet.CheckpointError(f"{path} is not a best.pt of main_federated.py (it lacks "
                                     f"'clients', 'global' or 'round').")
    entries = checkpoint['clients']
    if entries and not 0 <= client < len(entries):
        raise resnet.CheckpointError(f"{path} holds clients 0 to {len(entries) - 1}, not "
                                     f"{client}.")
    entry = entries[client] if entries else {**checkpoint['global'], 'bits': 0, 'centers': None}
    model = resnet.build(entry['arch'])
    model.load_state_dict(entry['state_dict'])
    info = {'round': checkpoint['round'], 'metrics': checkpoint['metrics'],
            'config': checkpoint['config'], 'arch': entry['arch'], 'bits': entry['bits'],
            'centers': entry['centers']}
    return model.to(device).eval(), info


# --- the run -----------------------------------------------------------------------------------

def describe_partition(parts):
    sizes = [len(p['train_indices']) for p in parts]
    tests = [len(p['test_indices']) for p in parts]
    classes = [sum(c > 0 for c in p['train_class_counts']) for p in parts]
    return (f"{len(parts)} clients, {min(sizes)}-{max(sizes)} training and {min(tests)}-"
            f"{max(tests)} test images each, {min(classes)}-{max(classes)} classes each")


def train(cfg, overrides):
    """A new federated run, or the continuation of cfg['resume']; returns the run folder."""
    checkpoint = None
    if cfg['resume']:
        cfg, checkpoint = runtime.read_resume(cfg['resume'], overrides, RESUMABLE)
        cfg = {**DEFAULTS, **cfg}  # a run saved before a hyperparameter existed has its default
    dev = runtime.select_device(cfg['device'])
    runtime.prepare_device(dev, cfg['tf32'])
    print(f"device: {runtime.describe_device(dev)}")
    cifar = data.load_cifar10(cfg['data_root'], dev)
    parts = make_partition(cfg, cifar)
    datasets = client_data(cifar, parts)
    print(f"data: {describe_partition(parts)} ({cfg['partition']}), from "
          f"{data.batches_folder(cfg['data_root'])}")
    clients, global_model = initial_states(cfg, dev)
    run = {'clients': clients, 'global_model': global_model, 'datasets': datasets,
           'global_copy': None if global_model is None else build_model(cfg, cfg['global_arch'],
                                                                        dev),
           'sampler': torch.Generator().manual_seed(cfg['seed']), 'best': -1.0}
    if checkpoint is None:
        folder = cfg['resume'] or runtime.new_run_folder(
            cfg['results_dir'], cfg['run_name'] or default_run_name(cfg), SCRIPT)
        cfg['run_name'] = os.path.basename(os.path.normpath(folder))
        rows = []
    else:
        folder = cfg['resume']
        restore(run, checkpoint)
        rows = checkpoint['rows']
        runtime.write_rows(folder, rows)  # a log a kill left behind last.pt catches up
        print(f"resuming {folder} after round {len(rows)}")
    print('config: ' + json.dumps(cfg))
    runtime.write_json(os.path.join(folder, 'config.json'), cfg)
    runtime.write_json(os.path.join(folder, 'partition.json'), parts)

    def save(rows):
        save_best(cfg, run, folder, rows[-1])
        save_last(cfg, run, folder, rows)
    runtime.train_loop(folder, rows, cfg['rounds'], lambda rnd: run_round(cfg, run, rnd), save,
                       round_line, 'round', SCRIPT)
    best = max(rows, key=lambda row: row['q_test_acc_mean'])
    print(f"done: mean personalised quantized test accuracy {rows[-1]['q_test_acc_mean']:.4f} "
          f"in the last round, {best['q_test_acc_mean']:.4f} at best (round {best['round']}, "
          f"selected on test data); outputs in {folder}")
    return folder


def main(argv=None):
    """Run the federated experiment with `argv` overrides; a bad input ends it with a
    one-paragraph error (exit status 2), Ctrl-C with the command that continues it (exit status
    130), and every file already written stays as it was."""
    return runtime.run_guarded(lambda args: train(*make_config(args)),
                               sys.argv[1:] if argv is None else argv,
                               (resnet.CheckpointError, data.DataError, data.PartitionError))


if __name__ == '__main__':
    main()
