"""runtime.py: run folders that are never dead ends, leftovers of killed writes removed, the
lock, disk-full and permission messages, resumes of hand-edited configurations refused before
anything is written, and the code version each run records."""
import os
import signal
import subprocess
import sys
import time

import pytest
import tqdm

import main_centralized as mc
import main_federated as mf
import runtime
from conftest import ROOT, central_args, cnn_fed_args, exits_with_error


def test_script_defaults_are_read_from_the_source_as_the_script_defines_them():
    import main_federated as mf
    assert runtime.script_defaults(str(ROOT / 'main_federated.py')) == mf.DEFAULTS
    assert runtime.script_defaults(str(ROOT / 'main_centralized.py')) == mc.DEFAULTS


@pytest.mark.parametrize('delay', [0.2, 0.7, 1.5, 3.0])
def test_ctrl_c_at_any_moment_of_a_start_ends_with_one_line(cifar_root, tmp_path, delay):
    """SIGINT while torch loads, while the data loads or in the first epoch: one line on
    stderr, no traceback, exit status 130, and the run (if one began) still resumable."""
    child = subprocess.Popen(
        [sys.executable, str(ROOT / 'main_centralized.py'), f'--data_root={cifar_root}',
         f'--results_dir={tmp_path}', '--run_name=r', '--resn=8', '--cold_start=True',
         '--EPOCHS=20', '--BATCH_SIZE=50'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, cwd=ROOT)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = err.strip().splitlines()
    assert child.returncode == runtime.INTERRUPTED, err
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(('interrupted while starting', 'interrupted before the run',
                                'interrupted: '))


# --- configuration checks ------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['a/b', '..', '/tmp/escape', '../up'])
def test_a_run_name_that_leaves_results_dir_is_refused(cifar_root, tmp_path, capsys, name):
    exits_with_error(capsys, mc.main, central_args(cifar_root, tmp_path, name=name),
                     'is not a folder name')
    exits_with_error(capsys, mf.main, cnn_fed_args(cifar_root, tmp_path, name=name),
                     'is not a folder name')
    assert not (tmp_path / 'results').exists() and not os.path.exists('/tmp/escape')


def test_an_empty_results_dir_is_refused(cifar_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exits_with_error(capsys, mf.main, [*cnn_fed_args(cifar_root, tmp_path), '--results_dir='],
                     'results_dir is empty')
    assert sorted(os.listdir(tmp_path)) == ['data']


@pytest.mark.parametrize('arg, phrase', [
    ('--data_root=', 'data_root is empty'), ('--device=meta', "device='meta'"),
    (f'--seed={2 ** 70}', 'seed='), ('--lambda_coef=nan', 'finite number'),
    ('--val_fraction=1.0', 'val_fraction=1.0')])
def test_values_that_raised_tracebacks(cifar_root, tmp_path, capsys, arg, phrase):
    exits_with_error(capsys, mc.main, central_args(cifar_root, tmp_path) + [arg], phrase)
    assert not (tmp_path / 'results').exists()


@pytest.mark.parametrize('main, script', [(mc.main, 'main_centralized.py'),
                                          (mf.main, 'main_federated.py')])
def test_help_prints_the_usage_and_every_hyperparameter_with_its_comment(capsys, main, script):
    assert main(['--help']) is None
    out = capsys.readouterr().out
    assert f'usage: python {script}' in out
    defaults = mc.DEFAULTS if script == 'main_centralized.py' else mf.DEFAULTS
    assert all(f'--{name}' in out for name in defaults)
    assert 'quantization levels per layer' in out or 'KD temperature T' in out


# --- what a user watches -------------------------------------------------------------------------

class Terminal:
    def __init__(self):
        self.text = ''

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_shows_on_a_terminal_only(cifar_root, tmp_path, capsys, monkeypatch):
    mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='plain'))
    assert 'batches' not in capsys.readouterr().err
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1', name='tty'))
    bars = [bar for bar in terminal.text.split('\r') if bar.strip()]  # tqdm's; then cleared
    assert bars and all(bar.startswith('epoch 1: ') and '/4 [' in bar and 'batches/s' in bar
                        for bar in bars)
    assert terminal.text.endswith('\r')  # the line is cleared for the epoch's own line


def test_a_slow_bar_still_counts_batches_a_second():
    # tqdm's default shows '2.00s/ batches' below one a second (a slow CI machine did)
    bar = tqdm.tqdm.format_meter(n=1, total=4, elapsed=2.0, prefix='epoch 1', unit=' batches',
                                 bar_format=runtime.PROGRESS_FORMAT)
    assert bar.endswith('1/4 [00:02<00:06,  0.50 batches/s]')
