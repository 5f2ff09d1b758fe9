"""scripts/serve.py and serving.json without starting a server (the server fixture starts a real one)."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from model_dir import import_model_module
from multilora import EngineConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import serve  # noqa: E402

serving_config = import_model_module("serving_config")


def test_help_lists_options_and_their_environment_variables():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for text in ("--model", "MULTILORA_MODEL", "--adapter-roots", "--registry", "--max-loras",
                 "MULTILORA_GRPC_PORT", "--num-kv-blocks", "--host"):
        assert text in run.stdout


def test_environment_variables_are_defaults(monkeypatch):
    monkeypatch.setenv("MULTILORA_HTTP_PORT", "9100")
    monkeypatch.setenv("MULTILORA_MAX_LORAS", "8")
    args = serve.parse_args([])
    assert (args.http_port, args.max_loras, args.host) == (9100, 8, "127.0.0.1")
    assert serve.parse_args(["--http-port", "9200"]).http_port == 9200


def test_engine_settings_map_onto_engine_config():
    args = serve.parse_args(["--max-loras", "3", "--num-kv-blocks", "64", "--dtype", "float32",
                             "--engine-arg", "gpu_memory_utilization=0.5,max_cpu_loras=6"])
    settings = serve.engine_settings(args, "/models/x")
    assert settings == {"model": "/models/x", "enable_lora": True, "max_loras": 3, "max_lora_rank": 64,
                        "num_kv_blocks": 64, "dtype": "float32", "gpu_memory_utilization": "0.5",
                        "max_cpu_loras": "6"}
    config = EngineConfig.from_dict(settings)
    assert (config.max_loras, config.gpu_memory_utilization, config.max_cpu_loras) == (3, 0.5, 6)
    tp = serve.engine_settings(serve.parse_args(["--tensor-parallel-size", "2"]), "/models/x")
    assert EngineConfig.from_dict(tp).tensor_parallel_size == 2


def test_server_binds_locally_and_restricts_admin_apis():
    args = serve.parse_args([])
    cmd = serve.server_command("tritonserver", args, "/repo", None, "k3y")
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in cmd
    restricted = f"shared-memory,logging,model-repository,trace:{serve.ADMIN_HEADER}=k3y"
    assert f"--http-restricted-api={restricted}" in cmd and f"--grpc-restricted-protocol={restricted}" in cmd
    # The Python backend's shared memory carries this launcher's name, so it can remove exactly its own.
    assert f"--backend-config=python,shm-region-prefix-name=multilora_{os.getpid()}_" in cmd


def test_grpc_only_turns_http_off():
    cmd = serve.server_command("tritonserver", serve.parse_args(["--grpc-only"]), "/repo", None, "k3y")
    assert "--allow-http=false" in cmd and not any(c.startswith("--http-") for c in cmd)
    assert any(c.startswith("--grpc-restricted-protocol=") for c in cmd)


def test_admin_key_comes_from_the_environment_or_a_file_never_the_command_line(tmp_path, monkeypatch):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), "--admin-key", "s3cret"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "MULTILORA_ADMIN_KEY" in run.stderr and "--admin-key-file" in run.stderr
    monkeypatch.delenv("MULTILORA_ADMIN_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert serve.admin_key(serve.parse_args(["--admin-key-file", str(key_file)])) == "from-file"
    monkeypatch.setenv("MULTILORA_ADMIN_KEY", "from-env")
    assert serve.admin_key(serve.parse_args([])) == "from-env"
    # tritonserver gets it on its command line (its only way), never in its environment.
    env = serve.server_environment(None, str(tmp_path))
    assert "MULTILORA_ADMIN_KEY" not in env
    assert (env["MULTILORA_CONTROL_DIR"], env["MULTILORA_SHM_PREFIX"]) == (str(tmp_path), serve.shm_prefix())
    monkeypatch.delenv("MULTILORA_ADMIN_KEY")
    args = serve.parse_args(["--run-dir", str(tmp_path)])
    generated = serve.admin_key(args)
    assert len(generated) >= 24 and (tmp_path / "admin-key").read_text().strip() == generated
    assert (tmp_path / "admin-key").stat().st_mode & 0o077 == 0


def test_banner_curl_is_greedy_for_the_demo_model(capsys):
    args = serve.parse_args([])
    serve.print_banner(args, type("P", (), {"pid": 1})(), "/m", [])
    curl = next(line for line in capsys.readouterr().out.splitlines() if "curl" in line)
    assert '"temperature": 0' in curl and '"max_tokens": 48' in curl


def test_wheel_server_gets_this_pythons_libpython_first(tmp_path):
    wheel = tmp_path / "site-packages" / "pytriton" / "tritonserver"
    env = serve.server_environment(str(wheel), str(tmp_path / "control"))
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[:2] == [sysconfig.get_config_var("LIBDIR"), str(tmp_path / "site-packages" / "nvidia_pytriton.libs")]
    if sys.prefix != sys.base_prefix:  # the stub must find this virtual environment's python3 first
        assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def test_runtime_repository_holds_the_model_and_this_runs_serving_json(tmp_path):
    serving = {"engine": {"model": "/m", "enable_lora": True}, "adapters": {"roots": ["/a"], "registry": None,
                                                                            "hub_cache_dir": None}}
    repo = Path(serve.prepare_repository(str(tmp_path), serving))
    model = repo / "multilora"
    assert (model / "config.pbtxt").read_text() == (REPO / "model_repository/multilora/config.pbtxt").read_text()
    assert {"model.py", "io_tensors.py", "server_metrics.py", "serving_config.py"} <= {p.name for p in (model / "1").iterdir()}
    loaded = serving_config.load_serving_config(str(model))
    assert (loaded.engine, loaded.adapter_roots, loaded.registry) == ({"model": "/m", "enable_lora": True}, ["/a"], None)


def test_tracked_serving_json_is_valid_and_relative_to_itself():
    loaded = serving_config.load_serving_config(str(REPO / "model_repository" / "multilora"))
    assert loaded.engine["model"] == str(REPO / "models" / "demo-llama")
    assert loaded.adapter_roots == [str(REPO / "models" / "demo-adapters")]
    assert loaded.registry == str(REPO / "model_repository" / "multilora" / "multi_lora.json")
    EngineConfig.from_dict(loaded.engine)  # every key is an EngineConfig field


def test_serving_json_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="serving.json is missing"):
        serving_config.load_serving_config(str(tmp_path))
    (tmp_path / "serving.json").write_text('{"engine": {"model": "m"}, "adapters": {"root": "x"}}')
    with pytest.raises(ValueError, match="unknown \"adapters\" keys"):
        serving_config.load_serving_config(str(tmp_path))
