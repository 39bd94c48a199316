"""make_credentials.py never replaces credentials unasked, and says what was wrong."""
import pytest

pytest.importorskip('cryptography', reason='cryptography comes with requirements-flower.txt')
import make_credentials  # noqa: E402
from conftest import exits_with_error  # noqa: E402


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_credentials_are_written_once_and_replaced_only_with_force(tmp_path, capsys):
    folder = tmp_path / 'creds'
    make_credentials.main([str(folder), '--supernodes=2'])
    first = contents(folder)
    assert sorted(first) == ['ca.crt', 'server.key', 'server.pem', 'supernode_0',
                             'supernode_0.pub', 'supernode_1', 'supernode_1.pub']
    exits_with_error(capsys, make_credentials.main, [str(folder)], 'already holds credentials',
                     'ca.crt', '--force')
    assert contents(folder) == first
    make_credentials.main([str(folder), '--supernodes=2', '--force'])
    assert 'replacing ca.crt' in capsys.readouterr().out
    second = contents(folder)
    assert sorted(second) == sorted(first) and second['ca.crt'] != first['ca.crt']


@pytest.mark.parametrize('argv, phrase', [
    (['{tmp}/file'], 'is a file, not a folder'),
    (['{tmp}/new', '--supernodes=0'], '--supernodes=0: give the number of SuperNodes'),
    (['{tmp}/new', '--bogus'], 'unknown option --bogus'),
    ([], 'name one folder'),
])
def test_bad_credentials_commands(tmp_path, capsys, argv, phrase):
    (tmp_path / 'file').write_text('keep me')
    exits_with_error(capsys, make_credentials.main,
                     [a.format(tmp=tmp_path) for a in argv], phrase)
    assert (tmp_path / 'file').read_text() == 'keep me' and not (tmp_path / 'new').exists()
