"""Wall time of the same federated runs in process (main_federated.py) and as Flower
simulations (flower_app.simulate, one simulated SuperNode per client), one after the other on
this machine, whether their rows are equal, and where the simulation's round time goes.

    python bench/flower_overhead.py --data=PATH [--case=resnet8:20x3 --case=cifarnet:20x5]
                                    [--threads=1,2] [--repeats=2] [--algorithm=quped]

Each case (ARCH:CLIENTSxROUNDS) runs at each thread count, `--repeats` times. Each run is its
own process, timed from its start to its end (start-up included); the rounds' own times come
from metrics.jsonl (on Flower, round r's row holds round r's evaluation and round r + 1's
training, and the first row round 1's training too, so only their mean compares). The in-process run uses T torch threads and the simulation gives each
SuperNode T CPUs (Ray then runs cores / T SuperNodes at once, each with T threads), so their
numbers can be compared bit for bit. A Flower row also says how long its clients spent inside
flower_app's handlers and inside federated.py's units (summed over clients: `glue` is the
difference) and for how much of the round no handler ran (`idle`: Flower's messages and Ray's
scheduling). One JSON line per pair of runs; the last line printed is one JSON object with all
of them.
"""
import argparse
import json
import os
import re
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


def case(text):
    """(arch, clients, rounds) of 'resnet8:20x3'."""
    match = re.fullmatch(r'(\w+):(\d+)x(\d+)', text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not ARCH:CLIENTSxROUNDS, e.g. "
                                         f"resnet8:20x3")
    return match[1], int(match[2]), int(match[3])


def per_round(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def compare(data, arch, clients, rounds, threads, algorithm):
    """One in-process run and one simulation of the same configuration: their figures."""
    work = tempfile.mkdtemp(prefix='flower-overhead-')
    config = {'data_root': data, 'n_clients': clients, 'rounds': rounds,
              'client_archs': f"('{arch}',)", 'global_arch': arch, 'run_name': 'run',
              'algorithm': algorithm}
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    in_process = timed([sys.executable, 'main_federated.py', f'--results_dir={work}/script',
                        *(f'--{k}={v}' for k, v in config.items())], env)
    flower = timed([sys.executable, '-c', SIMULATE, ROOT,
                    json.dumps({**config, 'results_dir': f'{work}/flower'}), str(threads)], env)
    ours, theirs = runs.read_rows(f'{work}/script/run'), runs.read_rows(f'{work}/flower/run')
    strip = [[{k: v for k, v in r.items() if not k.endswith('seconds')} for r in rs]
             for rs in (ours, theirs)]
    rounds_in, rounds_flower = per_round(ours, 'wall_seconds'), per_round(theirs, 'wall_seconds')
    handlers = per_round(theirs, 'client_handler_seconds')
    inside = per_round(theirs, 'client_federated_seconds')
    return {'arch': arch, 'clients': clients, 'rounds': rounds, 'threads': threads,
            'algorithm': algorithm, 'in_process_s': round(in_process, 1),
            'flower_s': round(flower, 1), 'overhead': round(flower / in_process - 1, 3),
            'startup_in_process_s': round(in_process - rounds_in * rounds, 1),
            'startup_flower_s': round(flower - rounds_flower * rounds, 1),
            'round_in_process_s': round(rounds_in, 3), 'round_flower_s': round(rounds_flower, 3),
            'round_overhead': round(rounds_flower / rounds_in - 1, 3),
            'round_handlers_s': round(handlers, 3), 'round_federated_s': round(inside, 3),
            'round_glue_s': round(handlers - inside, 3),
            'round_idle_s': round(per_round(theirs, 'clients_idle_seconds'), 3),
            'rows_equal': strip[0] == strip[1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True, help='folder holding cifar-10-batches-py/')
    parser.add_argument('--case', type=case, action='append',
                        help='ARCH:CLIENTSxROUNDS, repeatable (default: resnet8:20x3 and '
                             'cifarnet:20x5)')
    parser.add_argument('--threads', default='1,2', help='thread counts, comma-separated')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--algorithm', default='quped')
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        parser.error(f"--data={args.data} is not a folder: point it at one that holds "
                     f"cifar-10-batches-py/, e.g. ../shared/data/cifar10-mini.")
    try:
        threads = [int(t) for t in args.threads.split(',')]
    except ValueError:
        parser.error(f"--threads={args.threads} is not a list of whole numbers, e.g. 1,2")
    results = []
    for arch, clients, rounds in args.case or [case('resnet8:20x3'), case('cifarnet:20x5')]:
        for count in threads:
            for _ in range(args.repeats):
                results.append(compare(os.path.abspath(args.data), arch, clients, rounds, count,
                                       args.algorithm))
                print(json.dumps(results[-1]), flush=True)
    print(json.dumps({'runs': results, 'rows_equal': all(r['rows_equal'] for r in results)}))


if __name__ == '__main__':
    main()
