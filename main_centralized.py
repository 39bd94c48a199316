"""QuPeD, centralized (Algorithm 1 of Ozkara et al., NeurIPS 2021) on CIFAR-10.

Edit the hyperparameters below and run `python main_centralized.py`, or override any of them:
    python main_centralized.py --resn=32 --n_centroids=4 --EPOCHS=300
Each run writes its logs and best checkpoints to {results_dir}/{run_name}/ (README.md, Outputs).
    python main_centralized.py --resume=Results/<run>            continue a killed run
    python main_centralized.py --evaluate=Results/<run>/best_quantized.pt   test a checkpoint
"""
# ---------------------------------------------------------------------------------------------
# Hyperparameters. The defaults are the paper's headline setting (ResNet-20, warm start, 1 bit).
resn = 20                    # ResNet depth: 8, 20, 32, 44, 56 or 110
n_centroids = 2              # quantization levels per layer: 2 = 1 bit, 4 = 2 bits, ...
cold_start = False           # True: random initialisation; False: warm start from pretrained_path
fp = False                   # True: train a full-precision model (SGD 0.1, no quantization)
lambda_coef = 1e-4           # prox strength: lambda = lambda_coef * epoch (1e-5 suits ResNet-8)
weight_decay = 0.0           # weight decay of the SGD optimizer
l1 = True                    # L1 prox and center regulariser (False: L2)
adam = True                  # weight optimizer: Adam lr 1e-2 (False: SGD lr 0.1, momentum 0.9)
lr2 = 1e-4                   # center learning rate; 0 fixes the centers at -1/+1 (binary prox)
lr2_milestones = (80, 140)   # epochs (0-based) from which lr2 is divided by 10, then by 100
lr_milestones = (100, 150)   # SGD: epochs from which the learning rate is divided by 10, 100
freeze_epoch = 200           # hard-quantize and freeze the quantized layers at the start of
                             # epoch freeze_epoch (1-based); beyond EPOCHS: never
EPOCHS = 250                 # training epochs of a QuPeD run
fp_epochs = 200              # training epochs of an fp=True run
BATCH_SIZE = 128             # training batch size
center_reg_fix = False       # True: descent sign for the L1 center regulariser (quirk 1 fixed)
save_pretrained = False      # fp=True: also save the best model at pretrained_path, for warm starts
seed = 1234                  # seeds the model's initialisation, shuffling and augmentation
data_root = 'data'           # folder holding cifar-10-batches-py/ (downloaded when absent)
results_dir = 'Results'      # each run writes to results_dir/run_name/
run_name = ''                # '' = resnet20_n2_adam_l1_<date-time>
pretrained_path = ''         # '' = pretrained/<the authors' file for resn>
device = 'auto'              # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'
resume = ''                  # a run folder: continue that run from its last.pt
evaluate = ''                # a checkpoint: report its test accuracy and exit
# ---------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple))}

import ast  # noqa: E402  (below the hyperparameters, so DEFAULTS holds only them)
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call  # noqa: E402

import data  # noqa: E402
import resnet  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402

# The authors' published full-precision checkpoints (github.com/kazkara/QuPeD).
PUBLISHED = {
    20: ('resnet20_fp_fpinit.pt', 'https://github.com/kazkara/QuPeD/raw/main/resnet20_fp_fpinit.pt',
         '3f093dcd89d47eaab18b897aee327d7cddb2cecc177430e9b54630ae9949fa88'),
    32: ('resnet32_fp_sgd1init.pt',
         'https://github.com/kazkara/QuPeD/raw/main/resnet32_fp_sgd1init.pt',
         '76e4f25e2f0a6dbc501e892c0682e5ee25741a503cf1f6136ed30b335c10e04d'),
}
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrained')
ADAM_LR, SGD_LR, SGD_MOMENTUM = 1e-2, 0.1, 0.9
LR2_AFTER_FREEZE = 1e-6  # the reference's fine-tuning center learning rate
LOGS = {'test.txt': 'test_acc', 'train.txt': 'train_acc', 'q_testacc.txt': 'q_test_acc',
        'q_trainloss.txt': 'q_train_loss'}  # the reference's four logs, as JSON lists
RESUMABLE = {'EPOCHS', 'fp_epochs', 'device', 'resume'}  # may change when a run is resumed


class ConfigError(Exception):
    """A hyperparameter or run folder the run cannot use; the message says what to do."""


class Diverged(Exception):
    """The training loss became non-finite."""


# --- configuration ---------------------------------------------------------------------------

def parse_value(name, text):
    """`text` as a value of the default's type (an int is fine where a float is expected)."""
    default = DEFAULTS[name]
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, (list, int)):
        value = tuple(value) if isinstance(value, list) else (value,)
    if type(value) is not type(default) or (
            isinstance(value, tuple) and not all(type(v) is int for v in value)):
        kind = 'a tuple of ints' if isinstance(default, tuple) else type(default).__name__
        example = f"({','.join(map(str, default))})" if isinstance(default, tuple) else default
        raise ConfigError(f"--{name}={text} is not {kind}: write it like the default, "
                          f"--{name}={example}.")
    return value


def parse_overrides(argv):
    """{name: value} from ['--name=value', ...], checked against the defaults."""
    overrides = {}
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            raise ConfigError(f"cannot read argument {arg!r}: write overrides as --name=value, "
                              f"e.g. --EPOCHS=10.")
        if name not in DEFAULTS:
            raise ConfigError(f"unknown hyperparameter {name!r}. Valid names: "
                              f"{', '.join(DEFAULTS)}.")
        overrides[name] = parse_value(name, text)
    return overrides


def check_config(cfg):
    """Raise ConfigError for values the run cannot use."""
    problems = []
    if cfg['resn'] not in (int(a.removeprefix('resnet')) for a in resnet.BLOCKS_PER_STAGE):
        problems.append(f"resn={cfg['resn']} is not a CIFAR ResNet here: choose one of "
                        f"{', '.join(a.removeprefix('resnet') for a in resnet.BLOCKS_PER_STAGE)}")
    if cfg['n_centroids'] < 2:
        problems.append(f"n_centroids={cfg['n_centroids']}: at least 2 levels are needed")
    for name in ('EPOCHS', 'fp_epochs', 'BATCH_SIZE'):
        if cfg[name] < 1:
            problems.append(f"{name}={cfg[name]}: must be at least 1")
    for name in ('lambda_coef', 'lr2', 'weight_decay'):
        if not (cfg[name] >= 0 and math.isfinite(cfg[name])):
            problems.append(f"{name}={cfg[name]}: must be a finite number >= 0 (lr2=0 fixes "
                            f"the centers)")
    for name in ('lr2_milestones', 'lr_milestones'):
        if list(cfg[name]) != sorted(set(cfg[name])) or any(m < 1 for m in cfg[name]):
            problems.append(f"{name}={cfg[name]}: must be increasing positive epochs")
    if cfg['freeze_epoch'] < 1:
        problems.append(f"freeze_epoch={cfg['freeze_epoch']}: must be at least 1 (beyond "
                        f"EPOCHS means never)")
    if problems:
        raise ConfigError('; '.join(problems) + '. Fix these hyperparameters and run again.')


def default_pretrained_path(depth):
    """pretrained/<the authors' file> for ResNet-20/32, pretrained/resnet{depth}_fp.pt else."""
    name = PUBLISHED[depth][0] if depth in PUBLISHED else f"resnet{depth}_fp.pt"
    return os.path.join(PRETRAINED_DIR, name)


def make_config(argv):
    cfg = dict(DEFAULTS)
    cfg.update(parse_overrides(argv))
    check_config(cfg)
    cfg['pretrained_path'] = cfg['pretrained_path'] or default_pretrained_path(cfg['resn'])
    return cfg


# --- schedules -------------------------------------------------------------------------------

def schedule(cfg, epoch):
    """The reference's per-epoch values for 0-based `epoch` (ALGORITHM.md, Schedules).

    lambda = lambda_coef * (epoch + 1), where lambda_coef grows x10 at every SGD learning-rate
    drop (not for ResNet-8); lambda2 likewise, but 0 from the freeze on. lr2 drops x10 at each
    of lr2_milestones and is 1e-6 after the freeze epoch; 0 stays 0. The quantized layers are
    hard-quantized and frozen at the start of epoch freeze_epoch - 1.
    """
    lr_drops = sum(epoch >= m for m in cfg['lr_milestones'])
    coef = cfg['lambda_coef'] * (10 ** lr_drops if not cfg['adam'] and cfg['resn'] != 8 else 1)
    frozen = not cfg['fp'] and epoch >= cfg['freeze_epoch'] - 1
    if cfg['lr2'] == 0:
        lr2_now = 0.0
    elif not cfg['fp'] and epoch > cfg['freeze_epoch']:
        lr2_now = LR2_AFTER_FREEZE
    else:
        lr2_now = cfg['lr2'] / 10 ** sum(epoch >= m for m in cfg['lr2_milestones'])
    return {'lam': coef * (epoch + 1), 'lam2': 0.0 if frozen else coef * (epoch + 1),
            'lr2': lr2_now, 'frozen': frozen, 'freeze_now': frozen and
            epoch == cfg['freeze_epoch'] - 1}


def total_epochs(cfg):
    return cfg['fp_epochs'] if cfg['fp'] else cfg['EPOCHS']


# --- model, optimizer, warm start ------------------------------------------------------------

def build_optimizer(cfg, model):
    """Adam for QuPeD with adam=True; SGD (0.1, momentum 0.9, MultiStepLR) otherwise."""
    if cfg['adam'] and not cfg['fp']:
        optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
        return optimizer, None
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM,
                                weight_decay=cfg['weight_decay'])
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg['lr_milestones']))


def download_published(resn_depth, path):
    """Fetch the authors' checkpoint for this depth to `path`, checking its sha256."""
    _, url, digest = PUBLISHED[resn_depth]
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except Exception as e:
        raise resnet.CheckpointError(
            f"the warm-start checkpoint {path} is missing and could not be downloaded from {url} "
            f"({type(e).__name__}: {e}). Download it on a machine with internet access and put "
            f"it at {path} (sha256 {digest}), or set --pretrained_path, or --cold_start=True.")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise resnet.CheckpointError(
            f"the file downloaded from {url} does not have the published sha256 {digest}; it was "
            f"not saved. Try again, or download it by hand to {path}.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    runtime.write_atomic(path, payload)


def warm_start(cfg, model):
    path = cfg['pretrained_path']
    if not os.path.exists(path):
        published = cfg['resn'] in PUBLISHED and path == default_pretrained_path(cfg['resn'])
        if not published:
            raise resnet.CheckpointError(
                f"the warm-start checkpoint {path} does not exist and the authors published none "
                f"for this path. Train one with --fp=True --save_pretrained=True "
                f"--pretrained_path={path}, point --pretrained_path at a checkpoint of "
                f"resnet{cfg['resn']}, or set --cold_start=True.")
        print(f"downloading the authors' checkpoint to {path}")
        download_published(cfg['resn'], path)
    resnet.load_checkpoint(model, path, f"resnet{cfg['resn']}")
    print(f"warm start from {path}")


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_model(model, images, labels, params=None):
    """(mean loss, accuracy) in eval mode; `params` swaps in other weights (the quantized ones)
    while keeping the model's BatchNorm statistics, as the reference does (quirk 5)."""
    model.eval()
    loss = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.int64)
    for x, y in data.eval_batches(images, labels):
        out = model(x) if params is None else functional_call(model, params, (x,))
        loss += F.cross_entropy(out, y, reduction='sum')
        correct += (out.argmax(1) == y).sum()
    n = labels.shape[0]
    return loss.item() / n, correct.item() / n


def load_model(path, device='cpu'):
    """A ready model (eval mode) from one of our checkpoints (best_fp.pt, best_quantized.pt,
    last.pt) or any CIFAR ResNet state_dict, and the checkpoint's `config`, `epoch` and
    `metrics` ({} for a bare state_dict). best_quantized.pt holds the quantized weights Q_c(x),
    so the model it gives is the quantized model."""
    state = resnet.read_state_dict(path)  # reports a missing or damaged file
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    info = {k: checkpoint[k] for k in ('config', 'epoch', 'metrics')
            if isinstance(checkpoint, dict) and k in checkpoint}
    arch = f"resnet{info['config']['resn']}" if 'config' in info else resnet.guess_arch(state)
    if arch is None:
        raise resnet.CheckpointError(f"checkpoint {path!r} is not a CIFAR ResNet of this "
                                     f"project (no layer1 blocks found).")
    model = resnet.build(arch)
    resnet.load_checkpoint(model, path, arch)
    return model.to(device).eval(), info


def report_checkpoint(cfg, dev):
    model, info = load_model(cfg['evaluate'], dev)
    cifar = data.load_cifar10(cfg['data_root'], dev)
    loss, acc = evaluate_model(model, cifar['test_x'], cifar['test_y'])
    saved = f", saved after epoch {info['epoch']}" if 'epoch' in info else ''
    print(f"{cfg['evaluate']}: test accuracy {acc:.4f} (loss {loss:.4f}) on "
          f"{cifar['test_y'].shape[0]} test images{saved}")
    return acc


# --- one epoch -------------------------------------------------------------------------------

def train_epoch(cfg, state, cifar, sched):
    """One epoch over the training set; QuPeD's update after every optimizer step."""
    model, optimizer = state['model'], state['optimizer']
    lr1 = optimizer.param_groups[0]['lr']
    model.train()
    loss_sum = torch.zeros((), device=cifar['train_y'].device)
    correct = torch.zeros((), device=cifar['train_y'].device, dtype=torch.int64)
    seen, members = 0, None
    for x, y in data.train_batches(cifar, cfg['BATCH_SIZE'], state['generator']):
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        if not cfg['fp']:
            members = utils.quped_update(
                state['weights'], state['centers'], x, y, lr1=lr1, lr2=sched['lr2'],
                lam=sched['lam'], lam2=sched['lam2'], l1=cfg['l1'],
                center_reg_fix=cfg['center_reg_fix'])
        loss_sum += loss.detach() * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        seen += y.shape[0]
    return loss_sum.item() / seen, correct.item() / seen, members, lr1


def freeze_quantized_layers(state):
    """The reference's fine-tuning: quantized layers stop receiving gradients."""
    for p in state['weights'].params:
        p.requires_grad_(False)


def run_epoch(cfg, state, cifar, epoch):
    """Train and evaluate 0-based `epoch`; returns its metrics row."""
    sched = schedule(cfg, epoch)
    if sched['freeze_now']:
        utils.hard_quantize_(state['weights'], state['centers'])
    if sched['frozen']:
        freeze_quantized_layers(state)
    sync = torch.cuda.synchronize if cifar['train_y'].is_cuda else (lambda: None)
    start = time.perf_counter()
    train_loss, train_acc, members, lr1 = train_epoch(cfg, state, cifar, sched)
    sync()
    trained = time.perf_counter()
    model = state['model']
    _, test_acc = evaluate_model(model, cifar['test_x'], cifar['test_y'])
    q_params = utils.quantized_state(state['weights'], state['centers'])
    _, q_test_acc = evaluate_model(model, cifar['test_x'], cifar['test_y'], q_params)
    q_train_loss, _ = evaluate_model(model, cifar['train_x'], cifar['train_y'], q_params)
    if state['scheduler'] is not None:
        state['scheduler'].step()
    if not math.isfinite(train_loss) or not torch.isfinite(state['centers']).all():
        raise Diverged(epoch + 1)
    return {'epoch': epoch + 1, 'train_loss': train_loss, 'train_acc': train_acc,
            'test_acc': test_acc, 'q_test_acc': q_test_acc, 'q_train_loss': q_train_loss,
            'lambda': sched['lam'], 'lambda2': sched['lam2'], 'lr1': lr1, 'lr2': sched['lr2'],
            'frozen': sched['frozen'], 'centers': state['centers'].tolist(),
            'members': None if members is None else members.long().tolist(),
            'train_seconds': trained - start, 'eval_seconds': time.perf_counter() - trained}


# --- outputs ---------------------------------------------------------------------------------

def default_run_name(cfg):
    kind = 'fp' if cfg['fp'] else f"n{cfg['n_centroids']}"
    opt = 'sgd' if cfg['fp'] or not cfg['adam'] else 'adam'
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f"resnet{cfg['resn']}_{kind}_{opt}_{'l1' if cfg['l1'] else 'l2'}_{stamp}"


def new_run_folder(cfg):
    name = cfg['run_name'] or default_run_name(cfg)
    folder = os.path.join(cfg['results_dir'], name)
    if os.path.exists(folder) and os.listdir(folder):
        raise ConfigError(f"{folder} already holds a run; it is never overwritten. Choose another "
                          f"--run_name, or continue that run with --resume={folder}.")
    os.makedirs(folder, exist_ok=True)
    return folder


def write_logs(folder, rows):
    """The reference's four JSON lists, metrics.jsonl, each written atomically."""
    for filename, key in LOGS.items():
        runtime.write_atomic(os.path.join(folder, filename),
                             json.dumps([row[key] for row in rows]).encode())
    runtime.write_atomic(os.path.join(folder, 'metrics.jsonl'),
                         ''.join(json.dumps(row) + '\n' for row in rows).encode())


def best_checkpoint(cfg, state, row, state_dict):
    return {'state_dict': state_dict, 'centers': state['centers'].cpu(), 'config': cfg,
            'epoch': row['epoch'], 'metrics': row}


def save_bests(cfg, state, folder, row):
    """best_fp.pt and best_quantized.pt when their test accuracy improves (strictly, as in the
    reference); with fp=True and save_pretrained, the best model's bare state_dict too."""
    if row['test_acc'] > state['best_test_acc']:
        state['best_test_acc'] = row['test_acc']
        model_state = {k: v.cpu() for k, v in state['model'].state_dict().items()}
        runtime.save_torch(os.path.join(folder, 'best_fp.pt'),
                           best_checkpoint(cfg, state, row, model_state))
        if cfg['fp'] and cfg['save_pretrained']:
            os.makedirs(os.path.dirname(os.path.abspath(cfg['pretrained_path'])), exist_ok=True)
            runtime.save_torch(cfg['pretrained_path'], model_state)
    if row['q_test_acc'] > state['best_q_test_acc']:
        state['best_q_test_acc'] = row['q_test_acc']
        q_state = {k: v.cpu() for k, v in state['model'].state_dict().items()}
        q_state.update({k: v.cpu() for k, v in
                        utils.quantized_state(state['weights'], state['centers']).items()})
        runtime.save_torch(os.path.join(folder, 'best_quantized.pt'),
                           best_checkpoint(cfg, state, row, q_state))


def save_last(cfg, state, folder, rows):
    """Everything a resumed run needs, written after the epoch's other outputs."""
    runtime.save_torch(os.path.join(folder, 'last.pt'), {
        'config': cfg, 'epoch': len(rows), 'rows': rows,
        'model': state['model'].state_dict(), 'optimizer': state['optimizer'].state_dict(),
        'scheduler': None if state['scheduler'] is None else state['scheduler'].state_dict(),
        'centers': state['centers'], 'generator': state['generator'].get_state(),
        'torch_rng': torch.get_rng_state(), 'python_rng': random.getstate(),
        'best_test_acc': state['best_test_acc'], 'best_q_test_acc': state['best_q_test_acc'],
        # for inspection only: a resumed run recomputes it from the epoch
        'schedule': schedule(cfg, len(rows)) if len(rows) < total_epochs(cfg) else None})


def print_row(row, epochs):
    print(f"epoch {row['epoch']:3d}/{epochs} | train loss {row['train_loss']:.4f} "
          f"acc {row['train_acc']:.4f} | test acc {row['test_acc']:.4f} | quantized test acc "
          f"{row['q_test_acc']:.4f} train loss {row['q_train_loss']:.4f} | lambda "
          f"{row['lambda']:.1e} lr1 {row['lr1']:.0e} lr2 {row['lr2']:.0e} | "
          f"{row['train_seconds']:.1f}s + {row['eval_seconds']:.1f}s", flush=True)


# --- the run ---------------------------------------------------------------------------------

def select_device(cfg):
    try:
        return runtime.select_device(cfg['device'])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def describe_device(dev):
    if dev.type == 'cuda':
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def initial_state(cfg, dev):
    runtime.seed_everything(cfg['seed'], dev)
    model = resnet.build(f"resnet{cfg['resn']}")
    if not cfg['cold_start']:
        warm_start(cfg, model)
    model.to(dev)
    optimizer, scheduler = build_optimizer(cfg, model)
    weights = utils.QuantizedWeights(model)
    try:
        centers = utils.init_centers(weights, cfg['n_centroids'], adam=cfg['adam'])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    generator = torch.Generator(device=dev)
    generator.manual_seed(cfg['seed'])
    return {'model': model, 'optimizer': optimizer, 'scheduler': scheduler, 'weights': weights,
            'centers': centers, 'generator': generator, 'best_test_acc': 0.0,
            'best_q_test_acc': 0.0}


def resumed_state(cfg, dev, checkpoint):
    state = initial_state({**cfg, 'cold_start': True}, dev)
    state['model'].load_state_dict(checkpoint['model'])
    state['optimizer'].load_state_dict(checkpoint['optimizer'])
    if state['scheduler'] is not None:
        state['scheduler'].load_state_dict(checkpoint['scheduler'])
    state['centers'].copy_(checkpoint['centers'])
    state['generator'].set_state(checkpoint['generator'])
    torch.set_rng_state(checkpoint['torch_rng'])
    random.setstate(checkpoint['python_rng'])
    state['best_test_acc'] = checkpoint['best_test_acc']
    state['best_q_test_acc'] = checkpoint['best_q_test_acc']
    return state


def read_resume_checkpoint(folder, overrides):
    path = os.path.join(folder, 'last.pt')
    if not os.path.isfile(path):
        raise ConfigError(f"--resume={folder}: no last.pt there, so there is nothing to resume "
                          f"(a run writes it at the end of its first epoch).")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        cfg = dict(checkpoint['config'])
    except Exception as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}); it is damaged. Start a "
                          f"new run instead.") from None
    changed = [f"{k} ({cfg.get(k)!r} -> {v!r})" for k, v in overrides.items()
               if k not in RESUMABLE and cfg.get(k) != v]
    if changed:
        raise ConfigError(f"a resumed run keeps its configuration, but these overrides differ "
                          f"from it: {', '.join(changed)}. Only {', '.join(sorted(RESUMABLE))} "
                          f"may change; start a new run for the others.")
    cfg.update({k: v for k, v in overrides.items() if k in RESUMABLE})
    return cfg, checkpoint


def train(cfg, overrides):
    """A new run, or the continuation of cfg['resume']; returns the run folder."""
    if cfg['resume']:
        cfg, checkpoint = read_resume_checkpoint(cfg['resume'], overrides)
        folder = cfg['resume']
    else:
        checkpoint = None
        folder = None
        if cfg['fp'] and cfg['save_pretrained'] and os.path.exists(cfg['pretrained_path']):
            raise ConfigError(f"save_pretrained would overwrite {cfg['pretrained_path']}: move "
                              f"that file or choose another --pretrained_path.")
    dev = select_device(cfg)
    if dev.type == 'cpu':
        runtime.keep_freed_memory()
    print(f"device: {describe_device(dev)}")
    cifar = data.load_cifar10(cfg['data_root'], dev)
    print(f"data: {cifar['train_y'].shape[0]} training and {cifar['test_y'].shape[0]} test "
          f"images from {data.batches_folder(cfg['data_root'])}")
    if checkpoint is None:
        state = initial_state(cfg, dev)
        folder = new_run_folder(cfg)
        cfg['run_name'] = os.path.basename(folder)
        rows = []
    else:
        state = resumed_state(cfg, dev, checkpoint)
        rows = checkpoint['rows']
        print(f"resuming {folder} after epoch {len(rows)}")
    print('config: ' + json.dumps(cfg))
    runtime.write_json(os.path.join(folder, 'config.json'), cfg)
    epochs = total_epochs(cfg)
    for epoch in range(len(rows), epochs):
        try:
            row = run_epoch(cfg, state, cifar, epoch)
        except Diverged as e:
            raise Diverged(
                f"the training loss or the centers became non-finite in epoch {e.args[0]}; the "
                f"run stopped and {folder} keeps the outputs of epoch {len(rows)}. Lower the "
                f"learning rates or lambda_coef and start again.") from None
        rows.append(row)
        print_row(row, epochs)
        write_logs(folder, rows)
        save_bests(cfg, state, folder, row)
        save_last(cfg, state, folder, rows)
    print(f"done: best test accuracy {state['best_test_acc']:.4f} (full precision), "
          f"{state['best_q_test_acc']:.4f} (quantized); outputs in {folder}")
    return folder


def main(argv=None):
    """Run the experiment with `argv` overrides; a bad input ends it with a one-paragraph error
    (exit status 2) and leaves every file already written as it was."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = parse_overrides(argv)
        cfg = make_config(argv)
        if cfg['evaluate']:
            return report_checkpoint(cfg, select_device(cfg))
        return train(cfg, overrides)
    except (ConfigError, resnet.CheckpointError, data.DataError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == '__main__':
    main()
