"""QuPeD, centralized (Algorithm 1 of Ozkara et al., NeurIPS 2021) on CIFAR-10.

Edit the hyperparameters below and run `python main_centralized.py`, or override any of them:
    python main_centralized.py --resn=32 --n_centroids=4 --EPOCHS=300
Each run writes its logs and best checkpoints to {results_dir}/{run_name}/ (docs/usage.md, Outputs).
    python main_centralized.py --resume=Results/<run>            continue a killed run
    python main_centralized.py --evaluate=Results/<run>/best_quantized.pt   test a checkpoint
"""
if __name__ == '__main__':  # first, so that a Ctrl-C while torch loads ends quietly too
    import startup  # noqa: F401
import datetime
import json
import math
import os
import sys

import torch

import data
import resnet
import runs
import runtime
import training
import utils

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
val_fraction = 0.0           # share of the training images held out for validation (stratified);
                             # > 0: best checkpoints chosen on it (0: on test, as the authors)
center_reg_fix = False       # True: descent sign for the L1 center regulariser (quirk 1 fixed)
save_pretrained = False      # fp=True: also save the best model at pretrained_path, for warm starts
seed = 1234                  # seeds the model's initialisation, shuffling and augmentation
data_root = 'data'           # folder holding cifar-10-batches-py/ (downloaded when absent)
results_dir = 'Results'      # each run writes to results_dir/run_name/
run_name = ''                # '' = resnet20_n2_adam_l1_<date-time>
pretrained_path = ''         # '' = pretrained/<the authors' file for resn>
device = 'auto'              # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'
tf32 = False                 # CUDA: TF32 convolutions and matmuls (not the authors' fp32)
resume = ''                  # a run folder: continue that run from its last.pt
evaluate = ''                # a checkpoint: report its test accuracy and exit
# ---------------------------------------------------------------------------------------------
DEFAULTS = runtime.hyperparameters(globals())

LOGS = {'test.txt': 'test_acc', 'train.txt': 'train_acc', 'q_testacc.txt': 'q_test_acc',
        'q_trainloss.txt': 'q_train_loss'}  # the reference's four logs, as JSON lists
RESUMABLE = {'EPOCHS', 'fp_epochs', 'device', 'resume', 'data_root'}  # may change on resume
KIND = 'centralized'  # what this script's run folders are (runs.KINDS)
ConfigError = runtime.ConfigError


# --- configuration ---------------------------------------------------------------------------

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
    if not 0 <= cfg['val_fraction'] < 1:
        problems.append(f"val_fraction={cfg['val_fraction']}: the share held out for validation "
                        f"must be in [0, 1)")
    if cfg['freeze_epoch'] < 1:
        problems.append(f"freeze_epoch={cfg['freeze_epoch']}: must be at least 1 (beyond "
                        f"EPOCHS means never)")
    problems += runtime.common_problems(cfg)
    if problems:
        raise ConfigError('; '.join(problems) + '. Fix these hyperparameters and run again.')


def make_config(argv):
    """(configuration, the overrides it came from) for command-line arguments `argv`."""
    overrides = runtime.parse_overrides(DEFAULTS, argv)
    cfg = {**DEFAULTS, **overrides}
    check_config(cfg)
    cfg['pretrained_path'] = (cfg['pretrained_path'] or
                              resnet.default_pretrained_path(cfg['resn']))
    return cfg, overrides


def check_trainable_batches(batch_size, n_train):
    """A batch size that leaves at least one batch of two or more images: BatchNorm cannot train
    on a single image, so such a batch is dropped (data.train_batches)."""
    if min(batch_size, n_train) < 2:
        raise ConfigError(f"BATCH_SIZE={batch_size} leaves no batch of two or more images on these "
                          f"{n_train} training images, and BatchNorm cannot train on one image: "
                          f"use a BATCH_SIZE of 2 or more (and at least 2 training images).")


# --- schedules -------------------------------------------------------------------------------

def total_epochs(cfg):
    return runs.total_of(KIND, cfg)[1]


# --- model, optimizer, warm start ------------------------------------------------------------

def download_published(resn_depth, path):
    """Fetch the authors' checkpoint for this depth to `path`, with a progress bar; torch.hub
    checks its sha256 and keeps nothing that fails the check."""
    _, url, digest = resnet.PUBLISHED[resn_depth]
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=digest, progress=True)
    except Exception as e:
        raise resnet.CheckpointError(
            f"the warm-start checkpoint {path} is missing and could not be downloaded from {url} "
            f"({type(e).__name__}: {e}). Download it on a machine with internet access and put "
            f"it at {path} (sha256 {digest}), or set --pretrained_path, or --cold_start=True.")


def warm_start(cfg, model):
    path = cfg['pretrained_path']
    if not os.path.exists(path):
        published = (cfg['resn'] in resnet.PUBLISHED and
                     path == resnet.default_pretrained_path(cfg['resn']))
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

def report_checkpoint(cfg, dev):
    model, info = runs.load_model(cfg['evaluate'], dev)
    cifar = data.load_cifar10(cfg['data_root'], dev)
    loss, acc = runtime.evaluate(model, cifar['test_x'], cifar['test_y'])
    saved = f", saved after epoch {info['epoch']}" if 'epoch' in info else ''
    print(f"{cfg['evaluate']}: test accuracy {acc:.4f} (loss {loss:.4f}) on "
          f"{cifar['test_y'].shape[0]} test images{saved}")
    return acc


# --- outputs ---------------------------------------------------------------------------------

def default_run_name(cfg):
    kind = 'fp' if cfg['fp'] else f"n{cfg['n_centroids']}"
    opt = 'sgd' if cfg['fp'] or not cfg['adam'] else 'adam'
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f"resnet{cfg['resn']}_{kind}_{opt}_{'l1' if cfg['l1'] else 'l2'}_{stamp}"


def best_checkpoint(cfg, state, row, state_dict, quantized):
    return {**runs.checkpoint_fields(KIND, 'best_quantized' if quantized else 'best_fp'),
            'state_dict': state_dict,
            'centers': None if state['centers'] is None else state['centers'].cpu(),
            'config': cfg, 'epoch': row['epoch'], 'metrics': row, 'quantized': quantized,
            'quantized_names': None if state['weights'] is None else state['weights'].names}


def selection_split(cfg):
    """'val' when validation images are held out, else 'test' (the reference's choice)."""
    return 'val' if cfg['val_fraction'] > 0 else 'test'


def best_files(cfg, state, folder, row):
    """{path: bytes} of best_fp.pt and best_quantized.pt (none for fp=True) when their
    validation accuracy (test accuracy with val_fraction 0, as in the reference) improves,
    strictly; with fp=True and save_pretrained, the best model's bare state_dict too."""
    split, files = selection_split(cfg), {}
    model_state = {k: v.cpu() for k, v in state['model'].state_dict().items()}
    if row[f'{split}_acc'] > state['best_acc']:
        state['best_acc'] = row[f'{split}_acc']
        files[os.path.join(folder, 'best_fp.pt')] = runs.torch_bytes(
            best_checkpoint(cfg, state, row, model_state, quantized=False))
        if cfg['fp'] and cfg['save_pretrained']:
            os.makedirs(os.path.dirname(os.path.abspath(cfg['pretrained_path'])), exist_ok=True)
            files[cfg['pretrained_path']] = runs.torch_bytes(model_state)
    if not cfg['fp'] and row[f'q_{split}_acc'] > state['best_q_acc']:
        state['best_q_acc'] = row[f'q_{split}_acc']
        q_state = {**model_state, **{k: v.cpu() for k, v in utils.quantized_state(
            state['weights'], state['centers'], cfg['l1']).items()}}
        files[os.path.join(folder, 'best_quantized.pt')] = runs.torch_bytes(
            best_checkpoint(cfg, state, row, q_state, quantized=True))
    return files


def last_checkpoint(cfg, state, rows, fingerprint):
    """Everything a resumed run needs."""
    return {**runs.checkpoint_fields(KIND, 'last'), 'config': cfg, 'epoch': len(rows),
            'rows': rows, **training.saved_state(state),
            'quantized_names': None if state['weights'] is None else state['weights'].names,
            **runtime.rng_states(state['generator']),
            'best_acc': state['best_acc'], 'best_q_acc': state['best_q_acc'],
            'data_fingerprint': fingerprint,
            # for inspection only: a resumed run recomputes it from the epoch
            'schedule': (training.protocol_schedule(cfg, len(rows))
                         if len(rows) < total_epochs(cfg) else None)}


def save(cfg, state, folder, rows, fingerprint):
    """The epoch's best checkpoints and last.pt, all written or none (a full disk leaves the
    previous epoch's files as they were); then come the logs, so that what a run shows is never
    ahead of what --resume continues from."""
    files = best_files(cfg, state, folder, rows[-1])
    files[os.path.join(folder, 'last.pt')] = runs.torch_bytes(
        last_checkpoint(cfg, state, rows, fingerprint))
    runs.write_together(files)


def epoch_line(row, epochs, left):
    """The stdout line of an epoch."""
    quantized = ('' if 'q_test_acc' not in row else
                 f" | quantized test {row['q_test_acc']:.4f} loss {row['q_train_loss']:.3g}"
                 f" | lambda {row['lambda']:.1e} lr2 {row['lr2']:.1e}")
    return (f"epoch {row['epoch']:3d}/{epochs} | train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f} | test {row['test_acc']:.4f}{quantized} | "
            f"train {row['train_seconds']:.1f}s eval {row['eval_seconds']:.1f}s | {left}")


# --- the run ---------------------------------------------------------------------------------

def initial_state(cfg, dev):
    runtime.seed_everything(cfg['seed'], dev)
    model = resnet.build(f"resnet{cfg['resn']}")
    if not cfg['cold_start']:
        warm_start(cfg, model)
    return training.protocol_state(cfg, model.to(dev), dev)


def resumed_state(cfg, dev, checkpoint):
    state = initial_state({**cfg, 'cold_start': True}, dev)
    training.load_state(state, checkpoint)
    runtime.restore_rng_states(checkpoint, state['generator'])
    state['best_acc'] = checkpoint['best_acc']
    state['best_q_acc'] = checkpoint['best_q_acc']
    return state


def logs(cfg):
    return {k: v for k, v in LOGS.items() if not cfg['fp'] or not v.startswith('q_')}


RELEASED_SIGN = ("note: center_reg_fix=False keeps the released code's sign of the L1 center "
                 "regulariser (ALGORITHM.md, quirk 1), which pushes the centers apart: on the "
                 "scaled protocol the quantized model ends near chance (docs/measurements.md). "
                 "--center_reg_fix=True uses the descent sign.")
QUIRK_5 = ("note: until the freeze (epoch {freeze}) the quantized model Q_c(x) runs with the "
           "full-precision model's BatchNorm statistics, as the authors evaluate it, so its "
           "accuracy stays near chance and its training loss can be huge (ALGORITHM.md, quirk "
           "5).")


def train(cfg, overrides):
    """A new run, or the continuation of cfg['resume']; returns the run folder."""
    checkpoint = None
    if cfg['resume']:
        cfg, checkpoint = runs.resume(cfg['resume'], overrides, RESUMABLE, KIND, DEFAULTS,
                                      check_config)
    elif cfg['fp'] and cfg['save_pretrained'] and os.path.exists(cfg['pretrained_path']):
        raise ConfigError(f"save_pretrained would overwrite {cfg['pretrained_path']}: move "
                          f"that file or choose another --pretrained_path.")
    dev = runtime.select_device(cfg['device'])
    runtime.prepare_device(dev, cfg['tf32'])
    print(f"device: {runtime.describe_device(dev)}")
    cifar = data.with_validation(data.load_cifar10(cfg['data_root'], dev), cfg['val_fraction'],
                                 cfg['seed'])
    fingerprint = data.fingerprint(cfg['data_root'])
    runs.check_data(checkpoint, fingerprint, cfg['data_root'])
    check_trainable_batches(cfg['BATCH_SIZE'], cifar['train_y'].shape[0])
    held_out = (f" ({cifar['val_y'].shape[0]} more held out for validation)"
                if cfg['val_fraction'] else '')
    print(f"data: {cifar['train_y'].shape[0]} training{held_out} and {cifar['test_y'].shape[0]} "
          f"test images from {data.batches_folder(cfg['data_root'])}")
    state = None
    if checkpoint is None:
        state = initial_state(cfg, dev)
        folder = cfg['resume'] or runs.new_run_folder(
            cfg['results_dir'], cfg['run_name'] or default_run_name(cfg), KIND)
    else:
        folder = cfg['resume']
    with runs.locked(folder):
        return train_in(cfg, checkpoint, folder, state, cifar, dev, fingerprint)


def train_in(cfg, checkpoint, folder, state, cifar, dev, fingerprint):
    """The run in its (locked) folder."""
    if checkpoint is None:
        cfg['run_name'] = os.path.basename(os.path.normpath(folder))
        rows = []
    else:
        state = resumed_state(cfg, dev, checkpoint)
        rows = checkpoint['rows']
        runs.write_rows(folder, rows, logs(cfg))  # logs a kill left behind last.pt catch up
        print(f"resuming {folder} after epoch {len(rows)}")
    print('config: ' + json.dumps(cfg))
    if not cfg['fp']:
        print(QUIRK_5.format(freeze=cfg['freeze_epoch']))
        if cfg['l1'] and not cfg['center_reg_fix']:
            print(RELEASED_SIGN)
    runs.write_config(folder, cfg, KIND)
    runs.train_loop(folder, rows, total_epochs(cfg),
                    lambda epoch: training.protocol_epoch(cfg, state, cifar, epoch),
                    lambda rows: save(cfg, state, folder, rows, fingerprint), epoch_line, KIND,
                    logs(cfg))
    split = {'val': 'validation', 'test': 'test'}[selection_split(cfg)]
    quantized = '' if cfg['fp'] else f", {state['best_q_acc']:.4f} (quantized)"
    print(f"done: best {split} accuracy {state['best_acc']:.4f} (full precision){quantized}; "
          f"outputs in {folder}")
    return folder


def run(argv):
    cfg, overrides = make_config(argv)
    if cfg['evaluate']:
        return report_checkpoint(cfg, runtime.select_device(cfg['device']))
    return train(cfg, overrides)


def main(argv=None):
    """Run the experiment with `argv` overrides; a bad input ends it with a one-paragraph error
    (exit status 2), Ctrl-C with the command that continues it (exit status 130), and every
    file already written stays as it was."""
    return runtime.run_guarded(run, sys.argv[1:] if argv is None else argv,
                               (resnet.CheckpointError, data.DataError),
                               lambda: runtime.usage(__file__, DEFAULTS))


if __name__ == '__main__':
    main()
