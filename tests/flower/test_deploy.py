"""The Flower app folder, certificates and keys, and the CLI commands that write them."""

import tomllib

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from fedbiscuit.cli import app
from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.flower import deploy
from fedbiscuit.flower.server_app import config_from_run_config


def test_the_app_carries_the_config_and_installs_nothing(tmp_path):
    cfg = config_from_dict(planted_run_config(tmp_path, "carried", algorithm="fedbiscuit"))
    folder = deploy.write_app(tmp_path / "app", cfg, resume=True)
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == []
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedbiscuit.flower.server_app:app",
        "clientapp": "fedbiscuit.flower.client_app:app",
    }
    run_config = project["tool"]["flwr"]["app"]["config"]
    assert run_config["resume"] is True
    assert config_from_run_config(run_config) == cfg


def test_certificates_cover_the_hosts_and_node_keys_are_what_flower_reads(tmp_path):
    paths = deploy.make_certificates(tmp_path, ["127.0.0.1", "server.example.org"])
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["server.example.org"]
    private, public = deploy.make_node_key(tmp_path, "node-0")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp384r1" and public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(private.stat().st_mode)[-3:] == "600" and oct(paths["key"].stat().st_mode)[-3:] == "600"


def test_cli_writes_the_app_with_absolute_paths_and_refuses_baselines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = planted_run_config(tmp_path, "cli", algorithm="fedbis")
    raw["output_dir"], raw["data"]["root"] = "runs", "data"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    done = runner.invoke(app, ["flower-app", "c.yaml", "--out", "fa", "--superlink", "10.0.0.5:9093"])
    assert done.exit_code == 0, done.output
    assert "flower-supernode --superlink 10.0.0.5:9093" in done.output and "flwr run" in done.output
    carried = config_from_run_config(
        tomllib.loads((tmp_path / "fa" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    )
    assert carried.output_dir == str(tmp_path / "runs") and carried.data.root == str(tmp_path / "data")
    refused = runner.invoke(app, ["flower-app", "c.yaml", "federated.algorithm=local", "--out", "fb"])
    assert refused.exit_code == 2 and "local engine" in refused.output
    certs = runner.invoke(app, ["flower-certs", "certs", "--host", "127.0.0.1", "--nodes", "2"])
    assert certs.exit_code == 0 and (tmp_path / "certs" / "node-1.pub").is_file()
