"""Time whole epochs of main_centralized.py's default protocol (ResNet-20, 1 bit, batch 128, warm
start): training plus the three evaluations a run logs, on 50,000 training and 10,000 test
images, through the functions the script runs (training.protocol_*), with its defaults read
from its source (the bench imports no script).

    python bench/epoch_time.py --data=PATH [--tile] [--device=cuda] [--epochs=3]
                               [--pretrained=PATH] [--train-images=50000] [--test-images=10000]

--tile builds the 50,000 and 10,000 images (or --train-images and --test-images) by repeating a
smaller set in the standard format (../shared/data/cifar10-mini, 5,170 and 1,017 images), or by
cutting it, where full CIFAR-10 cannot be had: a timing input only, never an accuracy. The first
epoch is a warm-up; the figure is the median of the others. The last line printed is one JSON
object.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
import data  # noqa: E402
import resnet  # noqa: E402
import runtime  # noqa: E402
import training  # noqa: E402

TRAIN, TEST = 50_000, 10_000


def tiled(images, labels, size):
    reps = -(-size // labels.shape[0])
    return images.repeat(reps, 1, 1, 1)[:size], labels.repeat(reps)[:size]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True, help='folder holding cifar-10-batches-py/')
    parser.add_argument('--tile', action='store_true', help='repeat a smaller set to full size')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--pretrained', default='', help="warm start (default: the script's)")
    parser.add_argument('--train-images', type=int, default=TRAIN, help='with --tile')
    parser.add_argument('--test-images', type=int, default=TEST, help='with --tile')
    args = parser.parse_args()
    defaults = runtime.script_defaults(os.path.join(ROOT, 'main_centralized.py'))
    cfg = {**defaults, 'device': args.device, 'data_root': args.data, 'pretrained_path':
           args.pretrained or resnet.default_pretrained_path(defaults['resn'])}
    folder = data.batches_folder(args.data)
    missing = [name for name in data.TRAIN_FILES + data.TEST_FILES
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        parser.error(f"--data={args.data} holds no complete CIFAR-10 batches ({', '.join(missing)} "
                     f"missing in {folder}): point --data at a folder that holds "
                     f"cifar-10-batches-py/, e.g. --data=../shared/data/cifar10-mini --tile.")
    if not os.path.isfile(cfg['pretrained_path']):
        parser.error(f"the warm start {cfg['pretrained_path']} is missing: pass --pretrained=PATH "
                     f"(e.g. ../shared/reference/pretrained/resnet20_fp_fpinit.pt), or run "
                     f"main_centralized.py once to download it.")
    try:
        device = runtime.select_device(cfg['device'])
    except runtime.ConfigError as e:
        parser.error(f"--device={args.device}: {e}")
    runtime.prepare_device(device, cfg['tf32'])
    cifar = data.load_cifar10(cfg['data_root'], device)
    if args.tile:
        cifar['train_x'], cifar['train_y'] = tiled(cifar['train_x'], cifar['train_y'],
                                                   args.train_images)
        cifar['test_x'], cifar['test_y'] = tiled(cifar['test_x'], cifar['test_y'],
                                                 args.test_images)
    runtime.seed_everything(cfg['seed'], device)
    model = resnet.build(f"resnet{cfg['resn']}")
    resnet.load_checkpoint(model, cfg['pretrained_path'], f"resnet{cfg['resn']}")
    state = training.protocol_state(cfg, model.to(device), device)
    seconds = []
    for epoch in range(args.epochs):
        training.synchronize(device)
        start = time.perf_counter()
        row = training.protocol_epoch(cfg, state, cifar, epoch)
        training.synchronize(device)
        seconds.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}: {seconds[-1]:.2f} s ({row['train_seconds']:.2f} training, "
              f"{row['eval_seconds']:.2f} evaluating)", flush=True)
    epoch_s = statistics.median(seconds[1:] or seconds)
    print(json.dumps({'device': runtime.describe_device(device), 'torch': torch.__version__,
                      'train_images': cifar['train_y'].shape[0],
                      'test_images': cifar['test_y'].shape[0],
                      'input': 'cifar10-mini tiled (timing only)' if args.tile else args.data,
                      'epoch_s': round(epoch_s, 3),
                      'projected_250_epochs_min': round(epoch_s * 250 / 60, 2)
                      if (cifar['train_y'].shape[0], cifar['test_y'].shape[0]) == (TRAIN, TEST)
                      else None}))


if __name__ == '__main__':
    main()
