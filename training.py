"""Algorithm 1's training on resident data, shared by both experiment scripts (and the bench):
the reference's per-epoch schedule, the weight optimizer, one epoch with QuPeD's update after
every optimizer step, the freeze, the evaluations the reference logs, and main_centralized.py's
protocol from its configuration (`protocol_*`). A model's training state is a plain
dict: `model`, `optimizer`, `scheduler`, `weights` and `centers` (None for a full-precision
model), and `generator` (its batches' order and augmentation).
"""
import math
import time

import torch
import torch.nn.functional as F

import data
import runtime
import utils

ADAM_LR, SGD_LR, SGD_MOMENTUM = 1e-2, 0.1, 0.9  # the reference's weight optimizers
LR2_AFTER_FREEZE = 1e-6  # the reference's fine-tuning center learning rate


def schedule(epoch, lambda_coef, lr2, lr2_milestones, freeze_epoch, lambda_scale=1,
             quantizing=True):
    """The reference's values for 0-based `epoch` (ALGORITHM.md, Schedules).

    lambda = lambda_coef * lambda_scale * (epoch + 1) (the reference's lambda_coef grows x10 at
    each SGD learning-rate drop: the caller's lambda_scale); lambda2 likewise, but 0 from the
    freeze on. lr2 drops x10 at each of lr2_milestones and is 1e-6 after the freeze epoch; 0
    stays 0. The quantized layers are hard-quantized and frozen at the start of epoch
    freeze_epoch - 1. `quantizing=False` (full-precision training) never freezes.
    """
    coef = lambda_coef * lambda_scale
    frozen = quantizing and epoch >= freeze_epoch - 1
    if lr2 == 0:
        lr2_now = 0.0
    elif quantizing and epoch > freeze_epoch:
        lr2_now = LR2_AFTER_FREEZE
    else:
        lr2_now = lr2 / 10 ** sum(epoch >= m for m in lr2_milestones)
    return {'lam': coef * (epoch + 1), 'lam2': 0.0 if frozen else coef * (epoch + 1),
            'lr2': lr2_now, 'frozen': frozen, 'freeze_now': frozen and epoch == freeze_epoch - 1}


def build_optimizer(model, adam, weight_decay=0.0, lr_milestones=()):
    """(optimizer, scheduler): Adam lr 1e-2 and no scheduler, or SGD lr 0.1 momentum 0.9 with
    the learning rate /10 at each of lr_milestones (epochs)."""
    if adam:
        return torch.optim.Adam(model.parameters(), lr=ADAM_LR), None
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM,
                                weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(lr_milestones))


def new_state(model, n_centroids, optimizer, scheduler, generator, adam_centers, names=None,
              l1=True):
    """The training state of `model` (on its device); n_centroids 0 = full precision. `l1`
    picks the L1 or L2 prox and center step, and how Q_c measures distance (utils.assign)."""
    state = {'model': model, 'optimizer': optimizer, 'scheduler': scheduler, 'weights': None,
             'centers': None, 'generator': generator, 'l1': l1}
    if n_centroids:
        state['weights'] = utils.QuantizedWeights(model, names)
        state['centers'] = utils.init_centers(state['weights'], n_centroids, adam=adam_centers)
    return state


def load_state(state, saved):
    """Restore what `saved_state` wrote into a state built as the saved one was."""
    state['model'].load_state_dict(saved['model'])
    state['optimizer'].load_state_dict(saved['optimizer'])
    if state['scheduler'] is not None:
        state['scheduler'].load_state_dict(saved['scheduler'])
    if state['centers'] is not None:
        state['centers'].copy_(saved['centers'])
        if saved['frozen']:
            freeze_quantized_layers(state)
    state['generator'].set_state(saved['generator'])


def saved_state(state):
    """What a checkpoint needs to continue `state` exactly."""
    return {'model': state['model'].state_dict(), 'optimizer': state['optimizer'].state_dict(),
            'scheduler': None if state['scheduler'] is None else state['scheduler'].state_dict(),
            'centers': state['centers'], 'generator': state['generator'].get_state(),
            'frozen': is_frozen(state)}


def is_frozen(state):
    return state['weights'] is not None and not state['weights'].params[0].requires_grad


def freeze_quantized_layers(state):
    """The reference's fine-tuning: quantized layers stop receiving gradients."""
    for p in state['weights'].params:
        p.requires_grad_(False)


def start_epoch(state, sched):
    """In the first epoch the schedule marks frozen, x <- Q_c(x) once and the quantized layers
    freeze (the freeze epoch itself for a model trained every epoch; a federated client not
    sampled in the freeze round gets it at the start of its next round)."""
    if state['weights'] is not None and sched['frozen'] and not is_frozen(state):
        utils.hard_quantize_(state['weights'], state['centers'], state['l1'])
        freeze_quantized_layers(state)


def train_epoch(state, dataset, batch_size, sched, center_reg_fix=False, update=True,
                progress=None):
    """One epoch over dataset's training images, QuPeD's update after every optimizer step
    (unless `update` is False or the model is full precision). Returns (mean loss, accuracy,
    the last batch's member counts, the weight learning rate). `progress` labels a counter of
    the batches on a terminal."""
    model, optimizer = state['model'], state['optimizer']
    update = update and state['weights'] is not None
    lr1 = optimizer.param_groups[0]['lr']
    model.train()
    device = dataset['train_y'].device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, members = 0, None
    batches = data.train_batches(dataset, batch_size, state['generator'])
    total = data.batch_count(dataset['train_y'].shape[0], batch_size)
    for x, y in runtime.progress(batches, total, progress, 'batches'):
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        if update:
            members = utils.quped_update(
                state['weights'], state['centers'], x, y, lr1=lr1, lr2=sched['lr2'],
                lam=sched['lam'], lam2=sched['lam2'], l1=state['l1'],
                center_reg_fix=center_reg_fix)
        loss_sum += loss.detach() * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        seen += y.shape[0]
    return loss_sum.item() / seen, correct.item() / seen, members, lr1


def evaluate_state(state, dataset):
    """The reference's evaluations: full-precision test accuracy, and the quantized model's
    test accuracy and loss on the un-augmented training images (with the full-precision model's
    BatchNorm statistics, quirk 5); a full-precision model stands for its own quantized one.
    With validation images, both accuracies on them too (`val_acc`, `q_val_acc`)."""
    model = state['model']
    q_params = None
    if state['weights'] is not None:
        q_params = utils.quantized_state(state['weights'], state['centers'], state['l1'])
    out = {}
    for split in ('test', 'val'):
        if dataset.get(f'{split}_y') is None or dataset[f'{split}_y'].numel() == 0:
            continue
        images, labels = dataset[f'{split}_x'], dataset[f'{split}_y']
        _, out[f'{split}_acc'] = runtime.evaluate(model, images, labels)
        out[f'q_{split}_acc'] = (out[f'{split}_acc'] if q_params is None else
                                 runtime.evaluate(model, images, labels, q_params)[1])
    out['q_train_loss'], _ = runtime.evaluate(model, dataset['train_x'], dataset['train_y'],
                                              q_params)
    return out


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run_epoch(state, dataset, sched, batch_size, center_reg_fix=False, update=True,
              progress=None):
    """Algorithm 1 for one epoch: train, evaluate; returns the epoch's metrics (without its
    number). Raises runtime.Diverged when the loss or the centers are no longer finite."""
    start_epoch(state, sched)
    device = dataset['train_y'].device
    start = time.perf_counter()
    train_loss, train_acc, members, lr1 = train_epoch(state, dataset, batch_size, sched,
                                                      center_reg_fix, update, progress)
    synchronize(device)
    trained = time.perf_counter()
    row = {'train_loss': train_loss, 'train_acc': train_acc, **evaluate_state(state, dataset)}
    if state['scheduler'] is not None:
        state['scheduler'].step()
    centers = state['centers']
    if not math.isfinite(train_loss) or (centers is not None and not torch.isfinite(centers).all()):
        raise runtime.Diverged
    return {**row, 'lambda': sched['lam'], 'lambda2': sched['lam2'], 'lr1': lr1,
            'lr2': sched['lr2'], 'frozen': sched['frozen'],
            'centers': None if centers is None else centers.tolist(),
            'members': None if members is None else members.long().tolist(),
            'train_seconds': trained - start, 'eval_seconds': time.perf_counter() - trained}


# --- main_centralized.py's protocol, from its configuration --------------------------------------

def protocol_schedule(cfg, epoch):
    """The reference's values for 0-based `epoch` of a main_centralized.py run (schedule); with
    SGD, lambda_coef grows x10 at every learning-rate drop, except for ResNet-8 (ALGORITHM.md,
    Schedules)."""
    lr_drops = sum(epoch >= m for m in cfg['lr_milestones'])
    scale = 10 ** lr_drops if not cfg['adam'] and cfg['resn'] != 8 else 1
    return schedule(epoch, cfg['lambda_coef'], cfg['lr2'], cfg['lr2_milestones'],
                    cfg['freeze_epoch'], scale, quantizing=not cfg['fp'])


def protocol_state(cfg, model, dev):
    """The training state of `model` (on `dev`) for main_centralized.py's configuration `cfg`."""
    optimizer, scheduler = build_optimizer(
        model, cfg['adam'] and not cfg['fp'], cfg['weight_decay'], cfg['lr_milestones'])
    generator = runtime.device_generator(cfg['seed'], dev)
    try:
        state = new_state(model, 0 if cfg['fp'] else cfg['n_centroids'], optimizer, scheduler,
                          generator, adam_centers=cfg['adam'], l1=cfg['l1'])
    except ValueError as e:
        raise runtime.ConfigError(str(e)) from None
    return {**state, 'best_acc': 0.0, 'best_q_acc': 0.0}


QUANTIZED_KEYS = ('q_test_acc', 'q_val_acc', 'q_train_loss', 'lambda', 'lambda2', 'lr2', 'frozen',
                  'centers', 'members')  # what a full-precision run's rows leave out


def protocol_epoch(cfg, state, cifar, epoch):
    """Train and evaluate 0-based `epoch` of a main_centralized.py run; returns its row."""
    row = {'epoch': epoch + 1, **run_epoch(
        state, cifar, protocol_schedule(cfg, epoch), cfg['BATCH_SIZE'], cfg['center_reg_fix'],
        update=not cfg['fp'], progress=f"epoch {epoch + 1}")}
    return {k: v for k, v in row.items() if k not in QUANTIZED_KEYS} if cfg['fp'] else row
