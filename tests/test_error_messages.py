"""Each mistake a new user made gets one line that says what is wrong and what to do, never a traceback."""
from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from fedlearn import FedAvg
from fedlearn.cli import build_parser, main
from fedlearn.transport import ClientBundle, DeploymentServer, ServerSettings, certs
from fedlearn.transport.client_process import run_client
from transport_support import ConstantClient, fedlearn_process, free_port, wait_for


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlearn: error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("toml, message", [
    ('[data]\nalpha = "0.1"\n', "[data] alpha must be a number, got the string '0.1' (write the number without quotes)"),
    ("[data]\naplha = 0.1\n", "unknown setting 'aplha' in [data] (did you mean [data] alpha?)"),
    ("[client]\nlocal_epoch = 2\n", "unknown setting 'local_epoch' in [client] (did you mean [client] local_epochs?)"),
    ("[data]\nlr = 0.1\n", "'lr' belongs in [client], not in [data]"),
    ("[sampling]\nclients_per_round = true\n", "[sampling] clients_per_round must be a whole number, got True"),
    ("[strateg]\nname = 'fedavg'\n", "unknown section [strateg] in"),
])
def test_config_file_mistakes_name_the_setting_and_the_fix(tmp_path, capsys, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    assert message in _one_line_error(capsys, ["simulate", "--quiet", "--config", str(path)])


def test_a_mistyped_strategy_parameter_lists_the_valid_ones(capsys):
    err = _one_line_error(capsys, ["simulate", "--quiet", "--strategy", "fedprox", "-p", "nu=1"])
    assert "strategy 'fedprox' has no parameter 'nu'; its parameters: mu, server_lr" in err
    err = _one_line_error(capsys, ["simulate", "--quiet", "--strategy", "fedadam", "-p", "server_lrr=0.1"])
    assert "(did you mean 'server_lr'?)" in err and "beta1" in err


def test_a_bad_flag_value_is_one_line_not_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "--rounds", "abc"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err
    assert err == "fedlearn simulate: error: argument --rounds: invalid int value: 'abc' (see fedlearn simulate --help)"


def test_resuming_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    err = _one_line_error(capsys, ["simulate", "--quiet", "--resume", str(tmp_path / "nope")])
    assert f"the run directory {tmp_path / 'nope'} does not exist" in err


def test_every_command_the_help_names_exists():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in parser.format_help().split("{", 1)[1].split("}", 1)[0].split(","):
        assert name in commands
        with pytest.raises(SystemExit) as shown:
            parser.parse_args([name, "--help"])
        assert shown.value.code == 0


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "creds"
    certs.create(out, ["0"])
    return out


def test_a_bad_client_arg_is_one_line(creds, capsys):
    err = _one_line_error(capsys, ["client", "--server", "127.0.0.1:1", "--credentials", str(creds / "clients" / "0"),
                                   "--client-module", "transport_support:make_constant_client",
                                   "--client-arg", "stepp=1"])
    assert "unexpected keyword argument 'stepp'" in err and "--client-arg given: stepp" in err


def test_an_insecure_client_against_a_tls_server_is_told_so(tmp_path, creds):
    settings = ServerSettings(address="127.0.0.1:0", run_dir=str(tmp_path / "run"),
                              certificate=str(creds / "server.pem"), private_key=str(creds / "server.key"),
                              allow_list=str(creds / "allowlist.txt"), wait_timeout=30)
    server = DeploymentServer({"w": np.zeros(3, np.float32)}, FedAvg(), rounds=1, settings=settings)
    port = server.start()
    try:
        with pytest.raises(ConnectionError, match=r"without TLS \(--insecure\).*drop --insecure"):
            run_client(ConstantClient("0"), f"127.0.0.1:{port}", identity=ClientBundle.load(creds / "clients" / "0").identity,
                       tls=None, retry_for=1)
    finally:
        server.stop(0)


def test_sigterm_on_the_server_says_what_was_saved_and_how_to_resume(tmp_path, creds):
    (tmp_path / "creds").symlink_to(creds)
    config = tmp_path / "server.toml"
    config.write_text(f'rounds = 2\n[sampling]\nclients_per_round = 1\neval_clients = 0\n[server]\n'
                      f'address = "127.0.0.1:{free_port()}"\nrun_dir = "run"\ncertificate = "creds/server.pem"\n'
                      f'private_key = "creds/server.key"\nallow_list = "creds/allowlist.txt"\n')
    log = tmp_path / "server.log"
    server = fedlearn_process(["server", "--config", str(config), "--quiet"], log)
    try:
        wait_for(lambda: "listening on port" in log.read_text(), 120, "the server to listen")
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 130
    finally:
        server.kill()
    text = log.read_text()
    assert "fedlearn: stopped; no round was completed" in text and "the same command resumes the run" in text
    assert "Traceback" not in text


def test_python_m_fedlearn_cli_exists():
    done = subprocess.run([sys.executable, "-m", "fedlearn.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "report" in done.stdout
