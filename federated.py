"""QuPeD's federated algorithm and its baselines as plain functions that an engine runs:
main_federated.py runs them in one process, flower_app.py on Flower. A client's units are
`client_round` (its training in a round) and `evaluate_client` (its metrics); the server's are
`sample_clients`, `aggregate` and `round_row`. The configuration's checks, the partitions and
the outputs (`best_file`, `last_file`; runs.py owns the folder they go in) live here too, so
that both engines check the same things and write the same files.

The released code defines only the center step's KD loss (utils.kd_loss, tested against the
authors' golden vectors); the rest of each round is this project's reading of the paper, each
uncertain choice a hyperparameter (docs/federated.md, "What is the authors' and what is ours").
"""
import copy
import dataclasses
import datetime
import hashlib
import math
import os
import statistics

import torch
import torch.nn.functional as F

import data
import resnet
import runs
import runtime
import training
import utils

PARTITIONS = ('pathological', 'dirichlet')
KD_FORMS = ('released', 'hinton')  # released: only the teacher's logits / T (quirk 8)
AGGREGATIONS = ('samples', 'uniform')
GLOBAL_TEACHERS = ('quantized', 'full_precision')
QUANTIZATION_RULES = {'cifarnet': utils.cnet_rule, 'cifarnet2': utils.cnet_rule}  # else ResNet
RESUMABLE = {'rounds', 'device', 'resume', 'data_root'}  # may change when a run is resumed
GLOBAL_SEED_OFFSET = 2 ** 32  # the global model's initial seed: past every client's
ConfigError = runtime.ConfigError


# --- configuration ---------------------------------------------------------------------------

def check_config(cfg):
    """Raise ConfigError for values a federated run cannot use."""
    problems = []
    for name, allowed in (('algorithm', ALGORITHMS), ('partition', PARTITIONS),
                          ('kd_form', KD_FORMS), ('kd_form_center', ('', *KD_FORMS)),
                          ('aggregation', AGGREGATIONS), ('global_teacher', GLOBAL_TEACHERS)):
        if cfg[name] not in allowed:
            problems.append(f"{name}={cfg[name]!r} is not one of "
                            f"{', '.join(a or repr(a) for a in allowed)}")
    for name in ('n_clients', 'rounds', 'local_epochs', 'BATCH_SIZE', 'freeze_round'):
        if cfg[name] < 1:
            problems.append(f"{name}={cfg[name]}: must be at least 1")
    fine_tunes = cfg['algorithm'] in ALGORITHMS and ALGORITHMS[cfg['algorithm']].fine_tunes
    if cfg['ft_epochs'] < (1 if fine_tunes else 0):
        problems.append(f"ft_epochs={cfg['ft_epochs']}: {cfg['algorithm']} fine-tunes for at "
                        f"least 1 epoch")
    if not 1 <= cfg['classes_per_client'] <= data.NUM_CLASSES:
        problems.append(f"classes_per_client={cfg['classes_per_client']}: a client holds 1 to "
                        f"{data.NUM_CLASSES} classes")
    if not cfg['dirichlet_alpha'] > 0:
        problems.append(f"dirichlet_alpha={cfg['dirichlet_alpha']}: must be positive")
    if not 0 < cfg['client_fraction'] <= 1:
        problems.append(f"client_fraction={cfg['client_fraction']}: must be in (0, 1]")
    if not 0 < cfg['val_fraction'] < 1:
        problems.append(f"val_fraction={cfg['val_fraction']}: the share of each client's "
                        f"training images held out for validation must be in (0, 1)")
    if not cfg['client_bits'] or any(not 0 <= b <= 8 for b in cfg['client_bits']):
        problems.append(f"client_bits={cfg['client_bits']}: give each 0 (full precision) to 8")
    archs = list(cfg['client_archs']) + [cfg['global_arch']]
    unknown = sorted({a for a in archs if a not in resnet.ARCHS})
    if unknown or not cfg['client_archs']:
        problems.append(f"unknown or missing architecture {', '.join(unknown) or '()'}: choose "
                        f"from {', '.join(resnet.ARCHS)}")
    if (cfg['algorithm'] in ALGORITHMS and ALGORITHMS[cfg['algorithm']].same_arch
            and set(cfg['client_archs']) != {cfg['global_arch']}):
        problems.append(f"{cfg['algorithm']} pulls each personalised model towards the global "
                        f"one, weight by weight: client_archs={cfg['client_archs']} must all be "
                        f"global_arch={cfg['global_arch']!r}")
    coefs = cfg['lambda_coef']
    if len(coefs) not in (1, len(cfg['client_archs'])) or not all(
            c >= 0 and math.isfinite(c) for c in coefs):
        problems.append(f"lambda_coef={coefs}: give one finite value >= 0, or one per entry of "
                        f"client_archs")
    for name in ('lambda_p', 'global_lambda_p'):
        if not 0 <= cfg[name] <= 1:
            problems.append(f"{name}={cfg[name]}: a KD weight must be in [0, 1]")
    for name in ('temp', 'global_lr', 'ft_lr'):
        if not (cfg[name] > 0 and math.isfinite(cfg[name])):
            problems.append(f"{name}={cfg[name]}: must be a finite number > 0")
    for name in ('lr2', 'weight_decay'):
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
    problems += runtime.common_problems(cfg)
    if problems:
        raise ConfigError('; '.join(problems) + '. Fix these hyperparameters and run again.')


def make_config(defaults, argv):
    """(configuration, the overrides it came from) for command-line arguments `argv`."""
    overrides = runtime.parse_overrides(defaults, argv)
    cfg = {**defaults, **overrides}
    check_config(cfg)
    return cfg, overrides


def client_kinds(cfg):
    """Every (architecture, bits) pair of client_archs x client_bits, in that order."""
    return [(arch, bits) for arch in cfg['client_archs'] for bits in cfg['client_bits']]


def client_plan(cfg, client):
    """(architecture, bits) of a client's personalised model: the kinds taken in turn, so that
    each group of len(client_kinds) consecutive clients holds one client of every kind."""
    kinds = client_kinds(cfg)
    return kinds[client % len(kinds)]


def lambda_coef_of(cfg, arch):
    coefs = cfg['lambda_coef']
    return coefs[0] if len(coefs) == 1 else coefs[list(cfg['client_archs']).index(arch)]


def round_schedule(cfg, rnd, arch):
    """Algorithm 1's schedule, per round, with the architecture's lambda_coef."""
    return training.schedule(rnd, lambda_coef_of(cfg, arch), cfg['lr2'], cfg['lr2_milestones'],
                             cfg['freeze_round'])


def default_run_name(cfg):
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f"fed_{cfg['algorithm']}_{cfg['n_clients']}c_{cfg['partition']}_{stamp}"


# --- data ------------------------------------------------------------------------------------

def make_partition(cfg, cifar):
    """[{client, train_indices, val_indices, test_indices, train_class_counts,
    val_class_counts, test_class_counts}]: each client's share of the training images, split
    (stratified) into its training and validation images, and its test images."""
    labels = cifar['train_y']
    if cfg['partition'] == 'pathological':
        shares = data.pathological_partition(labels, cfg['n_clients'], cfg['classes_per_client'],
                                             cfg['seed'], group_size=len(client_kinds(cfg)))
    else:
        shares = data.dirichlet_partition(labels, cfg['n_clients'], cfg['dirichlet_alpha'],
                                          cfg['seed'])
    test = data.test_partition(cifar['test_y'], data.class_counts(labels, shares), cfg['seed'])
    train, val = data.validation_split(labels, shares, cfg['val_fraction'], cfg['seed'])
    if cfg['BATCH_SIZE'] < 2:
        raise ConfigError(f"BATCH_SIZE={cfg['BATCH_SIZE']} gives batches of one image, which "
                          f"BatchNorm cannot train on: every client needs two or more training "
                          f"images per batch; use a BATCH_SIZE of 2 or more.")
    for client, (tr, va, te) in enumerate(zip(train, val, test)):
        if tr.numel() < 2 or va.numel() == 0 or te.numel() == 0:
            raise ConfigError(
                f"client {client} gets {tr.numel()} training, {va.numel()} validation and "
                f"{te.numel()} test images with this partition; each client needs two or more "
                f"training images (BatchNorm cannot train on one), a validation image and a "
                f"test image: use fewer clients, more classes per client or a larger "
                f"dirichlet_alpha, or a larger val_fraction.")
    counts = {name: data.class_counts(source, parts) for name, source, parts in (
        ('train', labels, train), ('val', labels, val), ('test', cifar['test_y'], test))}
    return [{'client': i, 'train_indices': tr.tolist(), 'val_indices': va.tolist(),
             'test_indices': te.tolist(), 'train_class_counts': counts['train'][i].tolist(),
             'val_class_counts': counts['val'][i].tolist(),
             'test_class_counts': counts['test'][i].tolist()}
            for i, (tr, va, te) in enumerate(zip(train, val, test))]


def client_dataset(cifar, part):
    """A client's training, validation and test images on the data's device."""
    return data.subset(cifar, *(torch.tensor(part[f'{name}_indices'], dtype=torch.long)
                                for name in ('train', 'val', 'test')))


def describe_partition(parts):
    sizes = {name: [len(p[f'{name}_indices']) for p in parts] for name in ('train', 'val', 'test')}
    classes = [sum(c > 0 for c in p['train_class_counts']) for p in parts]
    spans = ', '.join(f"{min(v)}-{max(v)} {label}" for label, v in (
        ('training', sizes['train']), ('validation', sizes['val']), ('test', sizes['test'])))
    return (f"{len(parts)} clients, {spans} images each, {min(classes)}-{max(classes)} classes "
            f"each")


# --- models and client states ----------------------------------------------------------------

def warm_start_arch(cfg):
    """The architecture of pretrained_path's checkpoint, for a warm start (None for a cold
    one). A checkpoint that fits none of the run's models is an error, not a silent cold
    start."""
    if cfg['cold_start']:
        return None
    arch = resnet.guess_arch(resnet.read_state_dict(cfg['pretrained_path']))
    archs = sorted(set(cfg['client_archs']) | {cfg['global_arch']})
    if arch not in archs:
        raise resnet.CheckpointError(
            f"cold_start=False, but the checkpoint {cfg['pretrained_path']!r} is "
            f"{'a ' + arch if arch else 'of no known architecture'} and this run's models are "
            f"{', '.join(archs)}: point --pretrained_path at a checkpoint of one of them, or set "
            f"--cold_start=True.")
    return arch


def build_model(cfg, arch, dev, seed):
    """A model of `arch` initialised from `seed`, warm-started when pretrained_path is of it."""
    torch.manual_seed(seed)
    model = resnet.build(arch)
    if warm_start_arch(cfg) == arch:
        resnet.load_checkpoint(model, cfg['pretrained_path'], arch)
    return model.to(dev)


def new_client_state(cfg, client, dev):
    """A client's private state: its personalised model with its Algorithm 1 state (Adam,
    centers, batches) for the algorithms that personalise, only its batch generator for the
    others. Client 0's model is main_centralized.py's for the same seed."""
    state = {'generator': runtime.device_generator(cfg['seed'] + client, dev),
             'global_optimizer': None}
    if not algorithm_of(cfg).personalised:
        return state
    arch, bits = client_plan(cfg, client)
    model = build_model(cfg, arch, dev, cfg['seed'] + client)
    optimizer, scheduler = training.build_optimizer(model, adam=True)
    names = QUANTIZATION_RULES.get(arch, utils.resnet_rule)(model)
    return {**training.new_state(model, 2 ** bits if bits else 0, optimizer, scheduler,
                                 state['generator'], adam_centers=True, names=names,
                                 l1=cfg['l1']), 'global_optimizer': None}


def new_global_model(cfg, dev):
    """The global model, or None for `local`, which has none; it starts from global_pretrained
    when one is given."""
    if not algorithm_of(cfg).global_model:
        return None
    model = build_model(cfg, cfg['global_arch'], dev, cfg['seed'] + GLOBAL_SEED_OFFSET)
    if cfg['global_pretrained']:
        load_global_pretrained(cfg, model)
    return model


def load_global_pretrained(cfg, model):
    """Load global_pretrained into the global model: the global model of a main_federated.py
    best.pt ({'arch', 'state_dict'}) or last.pt (its state_dict; the arch in its config), a
    `central` run's say, or a state_dict of global_arch in any layout resnet reads."""
    path, arch = cfg['global_pretrained'], cfg['global_arch']
    checkpoint = resnet.read_checkpoint(path)
    if runs.kind_of(checkpoint) not in ('federated', 'flower'):
        resnet.load_checkpoint(model, path, arch)
        return
    saved = checkpoint['global']
    if runs.file_of(checkpoint) == 'best' and saved is not None:
        saved_arch, state = saved['arch'], saved['state_dict']
    else:
        saved_arch, state = checkpoint['config']['global_arch'], saved
    if state is None or saved_arch != arch:
        raise resnet.CheckpointError(
            f"global_pretrained={path!r} holds "
            f"{'no global model' if state is None else 'a ' + saved_arch + ' global model'}, "
            f"and this run's global_arch is {arch}: give a file with a {arch} global model, or "
            f"the matching --global_arch.")
    model.load_state_dict(state)


def describe_global_start(cfg):
    """The line a run prints about where its global model starts."""
    if not algorithm_of(cfg).global_model:
        return (f"global_pretrained={cfg['global_pretrained']!r}: not used, {cfg['algorithm']} "
                f"has no global model" if cfg['global_pretrained'] else None)
    if not cfg['global_pretrained']:
        return "global model: from its own random initialisation"
    with open(cfg['global_pretrained'], 'rb') as f:
        digest = hashlib.file_digest(f, 'sha256').hexdigest()
    return (f"global model: warm-started from {cfg['global_pretrained']} (sha256 "
            f"{digest[:16]})")


def new_central_state(cfg, dev):
    """`central`'s training state: SGD on the global model (global_lr, global_momentum,
    weight_decay), kept across rounds, and its batch generator."""
    return {'optimizer': None, 'generator': runtime.device_generator(
        cfg['seed'] + GLOBAL_SEED_OFFSET, dev)}


def central_optimizer(cfg, state, global_model):
    if state['optimizer'] is None:
        state['optimizer'] = torch.optim.SGD(global_model.parameters(), lr=cfg['global_lr'],
                                             momentum=cfg['global_momentum'],
                                             weight_decay=cfg['weight_decay'])
    return state['optimizer']


def union_dataset(cifar, parts):
    """Every client's training images together (never a validation or test image)."""
    train = torch.tensor([i for part in parts for i in part['train_indices']], dtype=torch.long)
    return data.subset(cifar, train, test=torch.zeros(0, dtype=torch.long))


def central_round(cfg, state, global_model, union):
    """`central`'s round: local_epochs of cross-entropy SGD of the global model over the union
    of the clients' training images; returns its training metrics."""
    loss, accuracy = sgd_epochs(global_model, central_optimizer(cfg, state, global_model), union,
                                cfg['BATCH_SIZE'], state['generator'], cfg['local_epochs'])
    return {'train_loss': loss, 'train_acc': accuracy}


def saved_central_state(state):
    return {'optimizer': None if state['optimizer'] is None else state['optimizer'].state_dict(),
            'generator': state['generator'].get_state()}


def load_central_state(cfg, state, saved, global_model):
    if saved['optimizer'] is not None:
        central_optimizer(cfg, state, global_model).load_state_dict(saved['optimizer'])
    state['generator'].set_state(saved['generator'])


def describe_warm_start(cfg):
    arch = warm_start_arch(cfg)
    if arch is None:
        return "models: every one from its own random initialisation (cold_start=True)"
    return (f"models: every {arch} warm-started from {cfg['pretrained_path']}; the others from "
            f"their own random initialisation")


def saved_client_state(state):
    """What a checkpoint needs to continue a client exactly."""
    saved = training.saved_state(state) if 'model' in state else {
        'generator': state['generator'].get_state()}
    return {**saved, 'global_optimizer': state['global_optimizer']}


def load_client_state(state, saved):
    if 'model' in state:
        training.load_state(state, saved)
    else:
        state['generator'].set_state(saved['generator'])
    state['global_optimizer'] = saved['global_optimizer']


def model_state(model):
    """A detached copy of a model's state_dict, on its device."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_bytes(model):
    """The bytes of a model's state_dict sent as it is stored (float32 parameters)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --- one client's round ----------------------------------------------------------------------

def center_kd_form(cfg):
    """The center step's KD form: kd_form_center, or kd_form's where it is '' (unset), so that
    the weights and the centers descend one objective unless asked otherwise."""
    return cfg['kd_form_center'] or cfg['kd_form']


def kd_settings(cfg, form, lambda_p=None):
    return {'lambda_p': cfg['lambda_p'] if lambda_p is None else lambda_p, 'temp': cfg['temp'],
            'scale_student': form == 'hinton'}


@torch.no_grad()
def eval_logits(model, x):
    """The model's logits in eval mode (BatchNorm on its running statistics); its mode is put
    back."""
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    return out


def quped_client_step(cfg, state, global_copy, global_optimizer, x, y, sched, lr1):
    """QuPeD's client iteration on one batch:
    (a) a step of the personalised model x_i on the KD loss (kd_form) towards the global copy
        w_i, then Algorithm 1's prox step;
    (b) Algorithm 1's center step with the KD loss (center_kd_form) through Q_c(x_i);
    (c) a step of w_i on the KD loss (kd_form, weight global_lambda_p: 0 is FedAvg's local step)
        towards Q_c(x_i)'s logits from (b) (global_teacher='quantized') or x_i's from (a).
    w_i's teacher logits are those of its training-mode forward, which is also (c)'s graph
    (teacher_train_mode), or of an eval-mode forward. Every teacher is detached. Returns the
    detached (personal loss, personal logits, global loss, member counts or None)."""
    model, optimizer, weights, centers = (state[k] for k in ('model', 'optimizer', 'weights',
                                                             'centers'))
    teacher = None if cfg['teacher_train_mode'] else eval_logits(global_copy, x)
    global_logits = global_copy(x)
    teacher = global_logits.detach() if teacher is None else teacher
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = utils.kd_loss(logits, y, teacher, **kd_settings(cfg, cfg['kd_form']))
    loss.backward()
    optimizer.step()
    personal_logits, members = logits.detach(), None
    quantized_logits = personal_logits
    if weights is not None:
        utils.prox_step(weights, centers, lr1, sched['lam'], l1=cfg['l1'], lr2=sched['lr2'])
        center_kd = kd_settings(cfg, center_kd_form(cfg))
        members, quantized_logits = utils.center_step(
            weights, centers, x, y, sched['lr2'], sched['lam2'], l1=cfg['l1'],
            center_reg_fix=cfg['center_reg_fix'],
            loss_fn=lambda out, labels: utils.kd_loss(out, labels, teacher, **center_kd))
    global_teacher = quantized_logits if cfg['global_teacher'] == 'quantized' else personal_logits
    global_optimizer.zero_grad(set_to_none=True)
    global_loss = utils.kd_loss(global_logits, y, global_teacher,
                                **kd_settings(cfg, cfg['kd_form'], cfg['global_lambda_p']))
    global_loss.backward()
    global_optimizer.step()
    return loss.detach(), logits.detach(), global_loss.detach(), members


def qupel_client_step(cfg, state, global_copy, global_optimizer, x, y, sched, lr1):
    """QuPeL's client iteration (the authors' earlier method, the released update_prox's
    `qupel` branch): QuPeD's with an L2 pull in place of KD.
    (a) a step of x_i on cross-entropy plus lambda_p/2 ||x_i - w_i||^2 (its gradient added as
        lambda_p (x_i - w_i), as the released branch adds it), then the prox step;
    (b) the center step on cross-entropy, the gradient through Q_c(x_i) plus
        lambda_p (Q_c(x_i) - w_i);
    (c) FedAvg's local step of w_i (cross-entropy).
    With full-precision clients (bits 0) this is Ditto (Li et al. 2021) with the pull towards
    the client's current copy of the global model."""
    model, optimizer, weights, centers = (state[k] for k in ('model', 'optimizer', 'weights',
                                                             'centers'))
    lambda_p = cfg['lambda_p']
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    with torch.no_grad():
        for p, target in zip(model.parameters(), global_copy.parameters()):
            if p.grad is not None:
                p.grad.copy_(p.grad + lambda_p * (p - target))
    optimizer.step()
    members = None
    if weights is not None:
        utils.prox_step(weights, centers, lr1, sched['lam'], l1=cfg['l1'], lr2=sched['lr2'])
        targets = dict(global_copy.named_parameters())
        pull = torch.cat([targets[name].detach().reshape(-1) for name in weights.names])
        members, _ = utils.center_step(weights, centers, x, y, sched['lr2'], sched['lam2'],
                                       l1=cfg['l1'], center_reg_fix=cfg['center_reg_fix'],
                                       pull=(lambda_p, pull))
    global_optimizer.zero_grad(set_to_none=True)
    global_loss = F.cross_entropy(global_copy(x), y)
    global_loss.backward()
    global_optimizer.step()
    return loss.detach(), logits.detach(), global_loss.detach(), members


def global_optimizer_for(cfg, state, global_copy):
    """The global copy's local SGD: new every round (global_optimizer_reset, FedAvg's clients
    keep no state) or continuing the client's own from its previous round."""
    optimizer = torch.optim.SGD(global_copy.parameters(), lr=cfg['global_lr'],
                                momentum=cfg['global_momentum'], weight_decay=cfg['weight_decay'])
    if not cfg['global_optimizer_reset'] and state['global_optimizer'] is not None:
        optimizer.load_state_dict(state['global_optimizer'])
    return optimizer


def keep_global_optimizer(cfg, state, optimizer):
    if not cfg['global_optimizer_reset']:
        state['global_optimizer'] = copy.deepcopy(optimizer.state_dict())


def personalised_client_update(cfg, state, global_copy, dataset, sched, step):
    """`local_epochs` of a client iteration `step` (QuPeD's, QuPeL's) over the client's data;
    returns the client's training metrics."""
    global_optimizer = global_optimizer_for(cfg, state, global_copy)
    lr1 = state['optimizer'].param_groups[0]['lr']
    state['model'].train()
    global_copy.train()
    sums = torch.zeros(3, device=dataset['train_y'].device)  # loss, correct, global loss
    seen, members = 0, None
    for _ in range(cfg['local_epochs']):
        for x, y in data.train_batches(dataset, cfg['BATCH_SIZE'], state['generator']):
            loss, logits, global_loss, step_members = step(cfg, state, global_copy,
                                                           global_optimizer, x, y, sched, lr1)
            members = step_members if step_members is not None else members
            sums += torch.stack([loss * y.shape[0], (logits.argmax(1) == y).sum(),
                                 global_loss * y.shape[0]])
            seen += y.shape[0]
    keep_global_optimizer(cfg, state, global_optimizer)
    loss_sum, correct, global_loss_sum = sums.tolist()
    return {'train_loss': loss_sum / seen, 'train_acc': correct / seen,
            'global_train_loss': global_loss_sum / seen, 'lr1': lr1,
            'members': None if members is None else members.long().tolist()}


def sgd_epochs(model, optimizer, dataset, batch_size, generator, epochs):
    """(mean loss, accuracy) of `epochs` of plain cross-entropy steps on the training images."""
    model.train()
    sums = torch.zeros(2, device=dataset['train_y'].device)
    seen = 0
    for _ in range(epochs):
        for x, y in data.train_batches(dataset, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach() * y.shape[0], (logits.argmax(1) == y).sum()])
            seen += y.shape[0]
    loss_sum, correct = sums.tolist()
    return loss_sum / seen, correct / seen


def fedavg_client_update(cfg, state, global_copy, dataset, sched=None):
    """FedAvg's local step: `local_epochs` of plain cross-entropy SGD on the global copy."""
    optimizer = global_optimizer_for(cfg, state, global_copy)
    loss, accuracy = sgd_epochs(global_copy, optimizer, dataset, cfg['BATCH_SIZE'],
                                state['generator'], cfg['local_epochs'])
    keep_global_optimizer(cfg, state, optimizer)
    return {'global_train_loss': loss, 'train_acc': accuracy}


def local_client_update(cfg, state, global_copy, dataset, sched):
    """Algorithm 1 alone on the client's data, `local_epochs` epochs (training.train_epoch, as
    main_centralized.py runs it)."""
    epochs = [training.train_epoch(state, dataset, cfg['BATCH_SIZE'], sched,
                                   cfg['center_reg_fix']) for _ in range(cfg['local_epochs'])]
    members = epochs[-1][2]
    return {'train_loss': statistics.fmean(e[0] for e in epochs),
            'train_acc': statistics.fmean(e[1] for e in epochs), 'lr1': epochs[-1][3],
            'members': None if members is None else members.long().tolist()}


def client_round(cfg, client, state, global_state, global_copy, dataset, rnd):
    """One client's training in round `rnd` (0-based): w_i <- the global model, local
    training. Returns (w_i's state after it, or None for `local`; its aggregation weight; its
    training metrics). The unit an engine runs on a client."""
    sched = round_schedule(cfg, rnd, client_plan(cfg, client)[0])
    if global_copy is not None:
        global_copy.load_state_dict(global_state)
    algorithm = algorithm_of(cfg)
    if algorithm.personalised:
        training.start_epoch(state, sched)
    metrics = algorithm.client_update(cfg, state, global_copy, dataset, sched)
    new_state = None if global_copy is None else model_state(global_copy)
    weight = dataset['train_y'].shape[0] if cfg['aggregation'] == 'samples' else 1
    return new_state, weight, metrics


# --- the server ------------------------------------------------------------------------------

@torch.no_grad()
def aggregate(states, weights):
    """FedAvg: the clients' global copies averaged with weights w_i / sum w (w_i = n_i, the
    client's training images, or 1: `aggregation`), summed in the order given. Parameters and
    BatchNorm buffers alike (the global model is evaluated with its running statistics);
    integer buffers (BatchNorm's step counter) get the weighted mean rounded down."""
    total = sum(weights)
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = sum((w / total) * s[key] for s, w in zip(states, weights))
        else:
            averaged[key] = sum(w * s[key] for s, w in zip(states, weights)) // total
    return averaged


def sample_clients(cfg, sampler):
    """The clients that train this round: every client for `local` (it needs no server) and
    with client_fraction 1, else max(1, round(fraction * n)) drawn without replacement from the
    seeded `sampler`, in increasing order."""
    m = max(1, round(cfg['client_fraction'] * cfg['n_clients']))
    if not algorithm_of(cfg).communicates or m == cfg['n_clients']:
        return list(range(cfg['n_clients']))
    return sorted(torch.randperm(cfg['n_clients'], generator=sampler)[:m].tolist())


# --- evaluation and the round's row ------------------------------------------------------------

@torch.no_grad()
def teacher_scores(model, images, labels, classes):
    """How the global model, a client's teacher, predicts the client's images: its mean entropy
    (nats) and largest probability over the 10 classes, and its accuracy and mean entropy with
    the argmax and the softmax taken over the client's own `classes` only (those of its
    training images), which is all a client's labels can ask of it."""
    model.eval()
    sums = torch.zeros(4, device=labels.device)  # entropy, largest p, own correct, own entropy
    for x, y in data.eval_batches(images, labels):
        logits = model(x)
        p = F.softmax(logits, dim=1)
        own = F.softmax(logits[:, classes], dim=1)
        sums += torch.stack([-torch.xlogy(p, p).sum(), p.max(1).values.sum(),
                             (classes[own.argmax(1)] == y).sum(), -torch.xlogy(own, own).sum()])
    entropy, top, correct, own_entropy = (sums / labels.shape[0]).tolist()
    return {'global_val_entropy': entropy, 'global_val_maxprob': top,
            'global_val_acc_own': correct, 'global_val_entropy_own': own_entropy}


def own_classes(dataset):
    """The classes of a client's training images, in increasing order."""
    return torch.unique(dataset['train_y'])


def fine_tune_seed(cfg, rnd, client):
    """The batches of fedavg_ft's fine-tuning, a function of (seed, round, client) only, so
    that evaluating draws nothing from the training's generators."""
    return (cfg['seed'] * 1_000_003 + rnd * 10_007 + client) % 2 ** 63


def fine_tuned(cfg, client, global_model, dataset, rnd):
    """A copy of the global model after ft_epochs of cross-entropy SGD on the client's
    training images (FedAvg-FT); the global model is untouched."""
    model = copy.deepcopy(global_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg['ft_lr'],
                                momentum=cfg['global_momentum'], weight_decay=cfg['weight_decay'])
    generator = runtime.device_generator(fine_tune_seed(cfg, rnd, client),
                                         dataset['train_y'].device)
    sgd_epochs(model, optimizer, dataset, cfg['BATCH_SIZE'], generator, cfg['ft_epochs'])
    return model


def quantized_fine_tuned(cfg, client, global_model, dataset, rnd):
    """Algorithm 1's training state after ft_epochs epochs on the client's training images,
    started from a copy of the global model at the client's bits (FedAvg-QFT): Adam, centers
    initialised from the copy's weights, every epoch with the schedule QuPeD's personalised
    models have in round `rnd` (the freeze included); the global model is untouched."""
    arch, bits = model_plan(cfg, client)
    model = copy.deepcopy(global_model)
    optimizer, scheduler = training.build_optimizer(model, adam=True)
    generator = runtime.device_generator(fine_tune_seed(cfg, rnd, client),
                                         dataset['train_y'].device)
    state = training.new_state(model, 2 ** bits if bits else 0, optimizer, scheduler, generator,
                               adam_centers=True,
                               names=QUANTIZATION_RULES.get(arch, utils.resnet_rule)(model),
                               l1=cfg['l1'])
    sched = round_schedule(cfg, rnd, client_plan(cfg, client)[0])  # the lambda its entry logs
    training.start_epoch(state, sched)
    for _ in range(cfg['ft_epochs']):
        training.train_epoch(state, dataset, cfg['BATCH_SIZE'], sched, cfg['center_reg_fix'])
    return state


def model_plan(cfg, client):
    """(architecture, bits; 0 = full precision) of the model a client is evaluated with: its
    personalised model's, or the global architecture (at the client's bits where the algorithm
    quantizes a copy of the global model, as FedAvg-QFT)."""
    algorithm = algorithm_of(cfg)
    if algorithm.personalised:
        return client_plan(cfg, client)
    return cfg['global_arch'], client_plan(cfg, client)[1] if algorithm.client_models else 0


# --- the algorithms ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A federated algorithm, as every engine, row, check and plot looks it up (ALGORITHMS):
    adding one is adding an entry.

    client_update(cfg, state, global_copy, dataset, sched) -> metrics: a sampled client's
    training in a round (global_copy: its copy of the global model, None without one); None when
    no client trains (server_update trains the global model instead). evaluated(cfg, client,
    global_model, dataset, rnd) -> the model a client is evaluated with, a module or an
    Algorithm 1 training state (quantized); None: the client's own state if personalised, else
    the global model."""
    label: str                     # what the clients' accuracy is the accuracy of
    client_update: object = None
    personalised: bool = False     # each client keeps a model of its own (Algorithm 1's state)
    global_model: bool = True      # the run has a global model
    communicates: bool = True      # it travels to and from the sampled clients
    evaluated: object = None
    client_models: bool = False    # evaluated is a quantized state that best.pt keeps
    fine_tunes: bool = False       # needs ft_epochs >= 1
    same_arch: bool = False        # every client_archs entry must be global_arch
    server_update: object = None   # (cfg, server_state, global_model, union) -> metrics


def quped_client_update(cfg, state, global_copy, dataset, sched):
    return personalised_client_update(cfg, state, global_copy, dataset, sched, quped_client_step)


def qupel_client_update(cfg, state, global_copy, dataset, sched):
    return personalised_client_update(cfg, state, global_copy, dataset, sched, qupel_client_step)


ALGORITHMS = {
    'quped': Algorithm('personalised quantized', quped_client_update, personalised=True),
    'qupel': Algorithm('personalised quantized', qupel_client_update, personalised=True,
                       same_arch=True),
    'fedavg': Algorithm('global model', fedavg_client_update),
    'fedavg_ft': Algorithm('fine-tuned global model', fedavg_client_update,
                           evaluated=fine_tuned, fine_tunes=True),
    'fedavg_qft': Algorithm('quantized fine-tuned global model', fedavg_client_update,
                            evaluated=quantized_fine_tuned,
                            client_models=True, fine_tunes=True),
    'local': Algorithm('local quantized', local_client_update, personalised=True,
                       global_model=False, communicates=False),
    'central': Algorithm('centrally trained global model', None, communicates=False,
                         server_update=central_round),
}


def algorithm_of(cfg):
    return ALGORITHMS[cfg['algorithm']]


def keeps_client_models(cfg):
    """Whether best.pt keeps a quantized model per client (best_client_entry)."""
    algorithm = algorithm_of(cfg)
    return algorithm.personalised or algorithm.client_models


def accuracies(model, dataset):
    return {f'{split}_acc': runtime.evaluate(model, dataset[f'{split}_x'],
                                             dataset[f'{split}_y'])[1] for split in ('val', 'test')}


def evaluate_client(cfg, client, state, global_model, dataset, rnd, trained=None,
                    sent_bytes=0):
    """A client's entry of the round's row: its plan and sizes, its training metrics (`trained`,
    None when it did not train), the bytes it received and sent, and the accuracies of its model
    (quantized and full precision) and of the global model on its own validation and test
    images, with how it predicts the validation images as a teacher (teacher_scores). The unit
    an engine runs on a client after aggregation."""
    arch, bits = model_plan(cfg, client)
    algorithm = algorithm_of(cfg)
    entry = {'client': client, 'arch': arch, 'bits': bits or 32,
             'lambda': round_schedule(cfg, rnd, client_plan(cfg, client)[0])['lam'],
             'n_train': dataset['train_y'].shape[0], 'n_val': dataset['val_y'].shape[0],
             'n_test': dataset['test_y'].shape[0], 'sampled': trained is not None,
             'bytes_down': sent_bytes if trained is not None else 0,
             'bytes_up': sent_bytes if trained is not None else 0, **(trained or {}),
             'global_val_acc': None, 'global_test_acc': None,
             **dict.fromkeys(TEACHER_SCORES)}
    if global_model is not None:
        global_accs = accuracies(global_model, dataset)
        entry['global_val_acc'], entry['global_test_acc'] = (global_accs['val_acc'],
                                                             global_accs['test_acc'])
        entry.update(teacher_scores(global_model, dataset['val_x'], dataset['val_y'],
                                    own_classes(dataset)))
    evaluated = (state if algorithm.evaluated is None and algorithm.personalised else
                 global_model if algorithm.evaluated is None else
                 algorithm.evaluated(cfg, client, global_model, dataset, rnd))
    if isinstance(evaluated, dict):  # a training state: its quantized and full-precision model
        model_state = evaluated
        if not algorithm.personalised:
            state['fine_tuned'] = evaluated  # for best.pt
        evaluation = training.evaluate_state(model_state, dataset)
        entry.update(q_val_acc=evaluation['q_val_acc'], q_test_acc=evaluation['q_test_acc'],
                     fp_val_acc=evaluation['val_acc'], fp_test_acc=evaluation['test_acc'],
                     q_train_loss=evaluation['q_train_loss'],
                     centers=None if model_state['centers'] is None
                     else model_state['centers'].tolist())
    else:
        accs = accuracies(evaluated, dataset)
        entry.update(q_val_acc=accs['val_acc'], q_test_acc=accs['test_acc'],
                     fp_val_acc=accs['val_acc'], fp_test_acc=accs['test_acc'])
    finite = (entry.get('train_loss', 0.0), entry.get('global_train_loss', 0.0),
              sum(map(sum, entry.get('centers') or [])))
    if not all(math.isfinite(v) for v in finite):
        raise runtime.Diverged
    return entry


def summary(values, weights):
    """Sample-weighted mean, mean, std and min of per-client values (None if there are none)."""
    if any(v is None for v in values):
        return {'weighted': None, 'mean': None, 'std': None, 'min': None}
    return {'weighted': sum(v * w for v, w in zip(values, weights)) / sum(weights),
            'mean': statistics.fmean(values), 'std': statistics.pstdev(values),
            'min': min(values)}


SUMMARISED = [(f'{model}_{split}_acc', f'n_{split}') for model in ('q', 'fp', 'global')
              for split in ('val', 'test')] + [('global_val_acc_own', 'n_val')]
TEACHER_SCORES = ('global_val_entropy', 'global_val_maxprob', 'global_val_acc_own',
                  'global_val_entropy_own')


def round_row(cfg, rnd, entries, timings):
    """The round's row of metrics.jsonl from the clients' entries (in client order). The
    schedule's columns are those of client_archs[0]; each client's lambda is in its entry."""
    row = {'round': rnd + 1, 'clients': entries}
    for key, count in SUMMARISED:
        for stat, value in summary([c[key] for c in entries], [c[count] for c in entries]).items():
            row[f'{key}_{stat}'] = value
    for key in ('global_val_entropy', 'global_val_maxprob', 'global_val_entropy_own'):
        row[key] = summary([c[key] for c in entries], [c['n_val'] for c in entries])['weighted']
    sched = round_schedule(cfg, rnd, cfg['client_archs'][0])
    personal = algorithm_of(cfg).personalised
    return {**row, 'lambda': sched['lam'] if personal else None,
            'lambda2': sched['lam2'] if personal else None,
            'lr1': training.ADAM_LR if personal else None,
            'lr2': sched['lr2'] if personal else None,
            'global_lr': cfg['global_lr'] if algorithm_of(cfg).global_model else None,
            'frozen': sched['frozen'] if personal else False,
            'sampled': [c['client'] for c in entries if c['sampled']],
            'bytes_down': sum(c['bytes_down'] for c in entries),
            'bytes_up': sum(c['bytes_up'] for c in entries), **timings,
            'wall_seconds': timings['train_seconds'] + timings['eval_seconds']}



def round_line(cfg):
    """The stdout line of a round, as a function of (row, rounds, time left)."""
    label = algorithm_of(cfg).label

    def line(row, rounds, left):
        schedule = (f" | lambda {row['lambda']:.1e} lr2 {row['lr2']:.1e}"
                    if row['lambda'] is not None else '')
        return (f"round {row['round']:3d}/{rounds} | {label} acc val "
                f"{row['q_val_acc_weighted']:.4f} test {row['q_test_acc_weighted']:.4f}"
                f"{schedule} | {len(row['sampled'])} trained | train {row['train_seconds']:.1f}s "
                f"eval {row['eval_seconds']:.1f}s | {left}")
    return line


# --- outputs -----------------------------------------------------------------------------------

SELECTION = 'q_val_acc_weighted'  # best.pt: the clients' accuracy on all validation images


def quantized_model_state(state):
    """A personalised model's state_dict on the CPU, Q_c(x) in its quantized layers."""
    saved = {k: v.detach().cpu().clone() for k, v in state['model'].state_dict().items()}
    if state['weights'] is not None:
        saved.update({k: v.cpu() for k, v in utils.quantized_state(
            state['weights'], state['centers'], state['l1']).items()})
    return saved


def best_client_entry(cfg, client, state):
    """What best.pt keeps of a client: its quantized model, centers and plan (for FedAvg-QFT,
    the fine-tuned copy of this round's evaluation)."""
    arch, bits = model_plan(cfg, client)
    state = state if algorithm_of(cfg).personalised else state['fine_tuned']
    return {'client': client, 'arch': arch, 'bits': bits,
            'state_dict': quantized_model_state(state),
            'centers': None if state['centers'] is None else state['centers'].cpu(),
            'quantized_names': None if state['weights'] is None else state['weights'].names}


def improves(run, row):
    return row[SELECTION] > run['best']


def best_file(kind, cfg, folder, row, client_entries, global_model):
    """{path: bytes} of best.pt of a run of `kind` (runs.KINDS): every client's quantized model
    (best_client_entry, none for fedavg and fedavg_ft) and the global model, at the round whose
    SELECTION is the best so far."""
    return {os.path.join(folder, 'best.pt'): runs.torch_bytes({
        **runs.checkpoint_fields(kind, 'best'), 'config': cfg, 'round': row['round'],
        'metrics': row, 'selected_on': SELECTION,
        'clients': client_entries,
        'global': None if global_model is None else {
            'arch': cfg['global_arch'],
            'state_dict': {k: v.cpu() for k, v in global_model.state_dict().items()}}})}


def last_file(kind, cfg, folder, rows, clients, global_model, sampler, best, fingerprint,
              central=None):
    """{path: bytes} of last.pt of a run of `kind`: everything a resumed run needs (`clients`:
    each client's saved_client_state, or None when the clients keep their states themselves;
    `central`: saved_central_state, for `central`)."""
    return {os.path.join(folder, 'last.pt'): runs.torch_bytes({
        **runs.checkpoint_fields(kind, 'last'), 'config': cfg, 'round': len(rows), 'rows': rows,
        'clients': clients,
        'global': None if global_model is None else global_model.state_dict(),
        **runtime.rng_states(sampler), 'best': best, 'data_fingerprint': fingerprint,
        'central': central})}


def write_checkpoints(files):
    """A round's best.pt (when it improved) and last.pt, {path: bytes}, all written or none,
    before the logs: the one place every engine writes them (and where tests stand a kill)."""
    runs.write_together(files)
