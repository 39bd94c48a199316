"""plot.py on folders a user may hand it by mistake, or that were damaged: one paragraph, exit
status 2, nothing written; --table leaves such runs out; --out for one run's PNGs."""
import builtins
import json
import os

import pytest

import main_centralized as mc
import plot
from conftest import exits_with_error


@pytest.fixture
def run(cifar_root, tmp_path):
    return mc.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=run',
                    '--resn=8', '--cold_start=True', '--EPOCHS=1', '--BATCH_SIZE=128'])


def test_one_runs_pngs_go_where_out_says(run, tmp_path, capsys):
    plot.main([run, f'--out={tmp_path}/figures'])
    written = capsys.readouterr().out.split()
    assert written and all(p.startswith(f'{tmp_path}/figures/') for p in written)
    assert not [f for f in os.listdir(run) if f.endswith('.png')]


def test_a_run_folder_given_as_a_sweep_is_named(run, capsys):
    exits_with_error(capsys, plot.main, [f'--sweep={run}'], 'holds no summary.json',
                     f'a run folder: draw it with python plot.py {run}')


@pytest.mark.parametrize('config, metrics, phrase', [
    ('[]', None, 'does not hold a configuration'),
    (None, '5\n', 'line 1 of'),
])
def test_damaged_run_files_are_named(run, capsys, config, metrics, phrase):
    if config is not None:
        with open(os.path.join(run, 'config.json'), 'w') as f:
            f.write(config)
    if metrics is not None:
        with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:
            f.write(metrics)
    before = sorted(os.listdir(run))
    exits_with_error(capsys, plot.main, [run], phrase)
    assert sorted(os.listdir(run)) == before


def test_an_unreadable_metrics_file_is_left_out_of_a_table(run, cifar_root, tmp_path, capsys,
                                                          monkeypatch):
    other = mc.main([f'--data_root={cifar_root}', f'--results_dir={tmp_path}', '--run_name=b',
                     '--resn=8', '--cold_start=True', '--EPOCHS=1', '--BATCH_SIZE=128'])
    denied_path = os.path.join(run, 'metrics.jsonl')

    def guarded_open(path, *args, **kwargs):  # root reads every file: deny one by hand
        if os.fspath(path) == denied_path:
            raise PermissionError(13, 'Permission denied', path)
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(plot, 'open', guarded_open, raising=False)
    capsys.readouterr()
    plot.main(['--table', run, other])
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert len(table) == 3 and table[2].startswith('| b |')
    assert f'left out: {denied_path} cannot be read: permission denied' in captured.err


def test_a_table_leaves_out_a_run_whose_files_lack_keys(run, capsys):
    with open(os.path.join(run, 'config.json'), 'w') as f:
        json.dump({'EPOCHS': 1}, f)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        plot.main(['--table', run])
    assert exit_info.value.code == 2
    left_out, error = capsys.readouterr().err.strip().splitlines()
    assert left_out.startswith(f'left out: {run}: its config.json or metrics.jsonl lacks what')
    assert error.startswith('error: none of') and 'Traceback' not in error
