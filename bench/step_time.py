"""Time a plain training step against a full QuPeD iteration for ResNet-20, and against one
federated client iteration.

    python bench/step_time.py [--device=cpu|cuda] [--reps=20] [--warmup=3] [--glibc-defaults]

One process, one random batch of 128: the plain step is forward, backward and an Adam step; the
QuPeD iteration is the same plus the prox and center steps (n = 2 and n = 4); the federated
client iteration is federated.quped_client_step with ResNet-20 for both the personalised (1 bit)
and the global model: its steps (a), (b) and (c), main_federated.py's defaults otherwise. Each
figure is the median of `reps` timed repetitions after `warmup` untimed ones, the variants
interleaved so that drifts of the machine hit them alike. The process keeps freed memory as the
scripts do on CPU (runtime.keep_freed_memory); --glibc-defaults measures without that. The last
line printed is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
import federated  # noqa: E402
import resnet  # noqa: E402
import runtime  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402


def make_step(device, n_centroids):
    """A closure doing one iteration: plain Adam step, plus QuPeD's update when n_centroids."""
    torch.manual_seed(0)
    model = resnet.build('resnet20').to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    weights = utils.QuantizedWeights(model) if n_centroids else None
    centers = utils.init_centers(weights, n_centroids, adam=True) if n_centroids else None

    def step(x, y):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if n_centroids:
            utils.quped_update(weights, centers, x, y, lr1=1e-2, lr2=1e-4, lam=1e-4, lam2=1e-4)
    return step


def make_client_step(device):
    """A closure doing one federated client iteration, ResNet-20 personalised (1 bit) and
    global, with main_federated.py's defaults (read from the script, not imported)."""
    defaults = runtime.script_defaults(os.path.join(ROOT, 'main_federated.py'))
    cfg = {**defaults, 'client_archs': ('resnet20',), 'global_arch': 'resnet20',
           'client_bits': (1,)}
    torch.manual_seed(0)
    state = federated.new_client_state(cfg, 0, device)
    global_copy = resnet.build('resnet20').to(device)
    global_optimizer = federated.global_optimizer_for(cfg, state, global_copy)
    sched = federated.round_schedule(cfg, 0, 'resnet20')

    def step(x, y):
        federated.quped_client_step(cfg, state, global_copy, global_optimizer, x, y, sched,
                                    training.ADAM_LR)
    return step


def timed(step, x, y, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(x, y)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--reps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--glibc-defaults', action='store_true',
                        help="leave glibc's malloc thresholds as they are")
    args = parser.parse_args()
    kept = False if args.glibc_defaults else runtime.keep_freed_memory()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (128,), generator=generator).to(device)
    steps = {'fp': make_step(device, 0), 'n2': make_step(device, 2), 'n4': make_step(device, 4),
             'client': make_client_step(device)}
    times = {name: [] for name in steps}
    for rep in range(args.warmup + args.reps):
        for name, step in steps.items():
            ms = timed(step, x, y, device)
            if rep >= args.warmup:
                times[name].append(ms)
    median = {name: statistics.median(t) for name, t in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'cpu ({torch.get_num_threads()} threads)'
    for key, t in times.items():
        print(f'{key}: median {median[key]:.1f} ms, min {min(t):.1f}, max {max(t):.1f} '
              f'over {len(t)} reps')
    print(json.dumps({'device': name, 'torch': torch.__version__, 'keep_freed_memory': kept,
                      'fp_ms': round(median['fp'], 2),
                      'quped_ms_n2': round(median['n2'], 2), 'quped_ms_n4': round(median['n4'], 2),
                      'client_ms': round(median['client'], 2),
                      'ratio_n2': round(median['n2'] / median['fp'], 3),
                      'ratio_n4': round(median['n4'] / median['fp'], 3),
                      'ratio_client': round(median['client'] / median['fp'], 3)}))


if __name__ == '__main__':
    main()
