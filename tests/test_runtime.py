"""runtime.py: run folders that are never dead ends, leftovers of killed writes removed, the
lock, disk-full and permission messages, resumes of hand-edited configurations refused before
anything is written, and the code version each run records."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import main_centralized as mc
import runtime
from conftest import ROOT, exits_with_error


def hint(folder):
    return f'python x.py --resume={folder}'


def test_a_folder_holding_only_a_lock_and_unfinished_writes_takes_a_new_run(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / '.lock').write_text('123\n')
    (folder / '.tmp-abc').write_bytes(b'x' * 100)
    assert runtime.new_run_folder(str(tmp_path), 'run', hint) == str(folder)
    with runtime.locked(str(folder)):
        assert sorted(os.listdir(folder)) == ['.lock']  # the killed write's leftover is gone
    (folder / 'config.json').write_text('{}')
    with pytest.raises(runtime.ConfigError, match='already holds a run'):
        runtime.new_run_folder(str(tmp_path), 'run', hint)


def test_a_full_disk_at_the_lock_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'getpid', full)
    with pytest.raises(runtime.ConfigError) as info:
        with runtime.locked(str(tmp_path)):
            pass
    assert f'the disk holding {tmp_path} is full' in str(info.value)
    assert 'None' not in str(info.value)


@pytest.mark.parametrize('code, phrase', [
    (errno.ENOSPC, 'the disk holding F is full (No space left on device)'),
    (errno.EACCES, 'F cannot be written: permission denied'),
    (errno.EIO, 'Input/output error: F'),
])
def test_os_errors_are_described_with_their_folder(code, phrase):
    assert runtime.describe_os_error(OSError(code, os.strerror(code)), 'F') == phrase


@pytest.mark.parametrize('edit, phrases', [
    ({'EPOCHS': 'abc'}, ["EPOCHS='abc' is not int"]),
    ({'resn': 'eight'}, ["resn='eight' is not int"]),
    ({'resn': 9}, ['resn=9 is not a CIFAR ResNet']),
])
def test_a_hand_edited_configuration_is_refused_before_anything_is_written(cifar_root, tmp_path,
                                                                          capsys, edit, phrases):
    folder = tmp_path / 'run'
    folder.mkdir()
    cfg = {**mc.DEFAULTS, 'data_root': str(cifar_root), 'resn': 8, 'cold_start': True,
           'EPOCHS': 2, 'run_name': 'run', 'results_dir': str(tmp_path), **edit}
    (folder / 'config.json').write_text(json.dumps(cfg))
    before = (folder / 'config.json').read_bytes()
    exits_with_error(capsys, mc.main, [f'--resume={folder}'], str(folder / 'config.json'),
                     'edited or damaged', *phrases)
    assert (folder / 'config.json').read_bytes() == before
    assert sorted(os.listdir(folder)) == ['config.json']


def test_config_json_records_the_commit_it_ran(cifar_root, tmp_path):
    folder = mc.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=r',
                      '--resn=8', '--cold_start=True', '--EPOCHS=1', '--BATCH_SIZE=50'])
    with open(os.path.join(folder, 'config.json')) as f:
        code = json.load(f)['code']
    head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True,
                          text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert code[0]['commit'] == expected
    assert code[0]['clean'] in (True, False, None)
    mc.main([f'--resume={folder}', '--EPOCHS=2'])  # the same code: recorded once
    with open(os.path.join(folder, 'config.json')) as f:
        assert json.load(f)['code'] == code


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
