from vipd.cli import main


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("vipd ")
