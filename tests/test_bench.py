"""Every bench script runs, on a tiny CPU input, and prints its JSON line: bench/step_time.py,
bench/epoch_time.py, bench/flower_overhead.py and bench/gpu_check.sh's dry run. Their figures
are measurements, never asserted here; what is asserted is that they run and say what they
measured."""
import json
import os
import subprocess
import sys

import pytest
import torch

import resnet
from conftest import MINI, PRETRAINED, ROOT, SHARED, needs


def last_json(command, **kwargs):
    env = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**env, **kwargs.pop('env', {})}, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


def test_step_time_times_a_plain_step_quped_and_a_federated_client_iteration():
    figures, _ = last_json([sys.executable, 'bench/step_time.py', '--device=cpu', '--reps=1',
                            '--warmup=0'])
    assert figures['device'].startswith('cpu')
    for key in ('fp_ms', 'quped_ms_n2', 'quped_ms_n4', 'client_ms'):
        assert figures[key] > 0
    assert figures['ratio_client'] == pytest.approx(figures['client_ms'] / figures['fp_ms'],
                                                    abs=2e-3)


def test_epoch_time_runs_whole_epochs_of_the_default_protocol(cifar_root, tmp_path):
    warm = tmp_path / 'resnet20.pt'
    torch.save(resnet.build('resnet20').state_dict(), warm)
    figures, out = last_json([sys.executable, 'bench/epoch_time.py', f'--data={cifar_root}',
                              '--tile', '--device=cpu', '--epochs=2', '--train-images=96',
                              '--test-images=48', f'--pretrained={warm}'])
    assert figures['train_images'] == 96 and figures['test_images'] == 48
    assert figures['epoch_s'] > 0 and figures['projected_250_epochs_min'] is None  # not 50,000
    assert out.count('epoch ') == 2


@needs(MINI)
@needs(PRETRAINED / 'resnet20_fp_fpinit.pt')
def test_gpu_check_dry_run_does_every_step_on_the_cpu(tmp_path):
    figures, out = last_json(['bash', 'bench/gpu_check.sh', str(SHARED)],
                             env={'GPU_CHECK_DRY_RUN': '1', 'OUT': str(tmp_path),
                                  'PYTHON': sys.executable})
    assert 'tests collected' in (tmp_path / 'tests.txt').read_text()
    for step in ('== 1.', '== 2.', '== 3.', '== 4.'):
        assert step in out
    assert figures['device'].startswith('cpu') and figures['epoch_s'] > 0


def test_flower_overhead_compares_a_simulation_with_the_in_process_run(cifar_root):
    pytest.importorskip('flwr', reason='Flower is not installed (requirements-flower.txt)')
    figures, _ = last_json([sys.executable, 'bench/flower_overhead.py', f'--data={cifar_root}',
                            '--case=cifarnet:2x2', '--threads=1', '--repeats=1'])
    [run] = figures['runs']
    assert figures['rows_equal'] is True and (run['arch'], run['rounds']) == ('cifarnet', 2)
    assert run['in_process_s'] > 0 and run['flower_s'] > 0
    # the clients' handlers hold federated.py's units, at most one per core at a time
    assert 0 < run['round_federated_s'] <= run['round_handlers_s']
    assert run['round_handlers_s'] <= run['round_flower_s'] * os.cpu_count()
    assert 0 <= run['round_idle_s'] <= run['round_flower_s']


def test_bench_without_data_names_its_own_options(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'epoch_time.py'),
                             f'--data={tmp_path}/none'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert '--data=' in result.stderr and '--data_root' not in result.stderr
