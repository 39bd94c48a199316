"""Wall time of the same federated run in process (main_federated.py) and as a Flower
simulation (flower_app.simulate, one simulated SuperNode per client), one after the other on
this machine, and whether their rows are equal.

    python bench/flower_overhead.py --data=PATH [--clients=20] [--rounds=3] [--arch=resnet8]
                                    [--threads=1] [--algorithm=quped]

Each run is its own process, timed from its start to its end (start-up included); the rounds'
own times come from metrics.jsonl. The in-process run uses --threads torch threads and the
simulation gives each SuperNode as many CPUs (Ray then runs cores / threads SuperNodes at once,
each with that many threads), so their numbers can be compared bit for bit. The last line printed
is one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
import runs  # noqa: E402
SIMULATE = """
import sys
sys.path.insert(0, sys.argv[1])
import json, flower_app
config, cpus = json.loads(sys.argv[2]), int(sys.argv[3])
flower_app.simulate(config, config['n_clients'],
                    backend_config={'client_resources': {'num_cpus': cpus, 'num_gpus': 0}})
"""


def timed(command, env):
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:3])} failed:\n{result.stdout[-2000:]}"
                         f"{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True, help='folder holding cifar-10-batches-py/')
    parser.add_argument('--clients', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--arch', default='resnet8')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--algorithm', default='quped')
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        parser.error(f"--data={args.data} is not a folder: point it at one that holds "
                     f"cifar-10-batches-py/, e.g. ../shared/data/cifar10-mini.")
    work = tempfile.mkdtemp(prefix='flower-overhead-')
    config = {'data_root': os.path.abspath(args.data), 'n_clients': args.clients,
              'rounds': args.rounds, 'client_archs': f"('{args.arch}',)",
              'global_arch': args.arch, 'run_name': 'run', 'algorithm': args.algorithm}
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads)}
    script = [sys.executable, 'main_federated.py', f'--results_dir={work}/script',
              *(f'--{k}={v}' for k, v in config.items())]
    in_process = timed(script, env)
    flower = timed([sys.executable, '-c', SIMULATE, ROOT,
                    json.dumps({**config, 'results_dir': f'{work}/flower'}), str(args.threads)],
                   env)
    ours, theirs = runs.read_rows(f'{work}/script/run'), runs.read_rows(f'{work}/flower/run')
    strip = [[{k: v for k, v in r.items() if not k.endswith('seconds')} for r in rs]
             for rs in (ours, theirs)]
    per_round = [sum(r['wall_seconds'] for r in rs) / len(rs) for rs in (ours, theirs)]
    print(json.dumps({'clients': args.clients, 'rounds': args.rounds, 'arch': args.arch,
                      'threads': args.threads, 'algorithm': args.algorithm,
                      'in_process_s': round(in_process, 1), 'flower_s': round(flower, 1),
                      'overhead': round(flower / in_process - 1, 3),
                      'round_in_process_s': round(per_round[0], 2),
                      'round_flower_s': round(per_round[1], 2),
                      'round_overhead': round(per_round[1] / per_round[0] - 1, 3),
                      'rows_equal': strip[0] == strip[1]}))


if __name__ == '__main__':
    main()
