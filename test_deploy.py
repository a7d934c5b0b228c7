"""deploy/: the Kubernetes manifests agree with the server and the Dockerfile, and replicas behind
the shipped nginx configuration lose nothing while they restart one by one (issue 14).

nginx and haproxy are real binaries (.ci/run installs them with apt-get); the replicas are real
servers on SmolLM2 with one thread each.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

import llmapiserver as las
from test_llmapiserver import KEY, ServerProcess, free_port, in_thread

HERE = Path(__file__).resolve().parent
KUBE = HERE / "deploy" / "kubernetes"


def manifests() -> dict[str, dict]:
    """Every resource kustomization.yaml lists, by kind."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            found[doc["kind"]] = doc
    return found


def container() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def env() -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container()["env"]}


def test_kustomization_lists_every_manifest_and_nothing_missing() -> None:
    listed = set(yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"])
    assert listed == {path.name for path in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(manifests()) == {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget"}


def test_every_env_var_is_a_server_setting() -> None:
    settings = {f.name.upper() for f in las.dataclasses.fields(las.Settings)}
    assert set(env()) <= settings, set(env()) - settings


def test_probes_use_the_servers_readiness_and_liveness_routes() -> None:
    spec = container()
    assert spec["startupProbe"]["httpGet"]["path"] == "/health"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/health"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/live"
    assert spec["livenessProbe"]["timeoutSeconds"] >= 5  # answered on the event loop even mid-decode


def test_termination_grace_covers_prestop_drain_and_shutdown_grace() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = int(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    settings = env()
    needed = pre_stop + float(settings["DRAIN_DELAY"]) + int(settings["SHUTDOWN_GRACE"]) + 5
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_pod_runs_as_the_dockerfiles_user_with_a_read_only_root() -> None:
    uids = set(re.findall(r"useradd --uid (\d+)", (HERE / "Dockerfile").read_text()))
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert uids == {str(pod["securityContext"]["runAsUser"])}
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["enableServiceLinks"] is False
    mounts = {mount["mountPath"] for mount in container()["volumeMounts"]}
    assert "/tmp" in mounts  # the grammar check writes a temp file
    keys_file = env()["API_KEYS_FILE"]
    secret = manifests()["Secret"]
    keys_volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["metadata"]["name"])
    keys_mount = next(m for m in container()["volumeMounts"] if m["name"] == keys_volume["name"])
    name, content = next(iter(secret["stringData"].items()))
    assert keys_file == f"{keys_mount['mountPath']}/{name}"
    assert "API_KEYS" not in env()  # keys never in the pod spec


def test_the_secrets_keys_file_reads_as_keys(tmp_path: Path) -> None:
    content = next(iter(manifests()["Secret"]["stringData"].values()))
    (tmp_path / "keys").write_text(content)
    assert las._read_keys_file(str(tmp_path / "keys")) == ("change-me-to-a-long-random-key",)


def test_manifests_pass_yamllint() -> None:
    result = subprocess.run([las.sys.executable, "-m", "yamllint", "-c", str(HERE / "deploy" / ".yamllint"),
                             str(HERE / "deploy")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_manifests_validate_strictly_against_kubernetes(version: str) -> None:
    files = [str(KUBE / name) for name in yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]]
    result = subprocess.run([str(Path(las.sys.executable).parent / "kubernetes-validate"), "--strict", "-k", version,
                             *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files)


def test_gpu_overlay_asks_for_one_gpu_and_sets_only_server_settings() -> None:
    overlay = yaml.safe_load((KUBE / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    patch = yaml.safe_load((KUBE / "gpu" / overlay["patches"][0]["path"]).read_text())
    spec = patch["spec"]["template"]["spec"]["containers"][0]
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    settings = {f.name.upper() for f in las.dataclasses.fields(las.Settings)}
    assert {item["name"] for item in spec["env"]} <= settings
    optional = yaml.safe_load((KUBE / "optional" / "kustomization.yaml").read_text())["resources"]
    assert all((KUBE / "optional" / name).exists() for name in optional if name != "..")


def test_the_deployments_env_starts_the_server(model_path: str, tmp_path: Path) -> None:
    """The pod's env, with the paths and port of this machine: the server starts and answers."""
    content = next(iter(manifests()["Secret"]["stringData"].values()))
    (tmp_path / "api-keys").write_text(content)
    port = free_port()
    pod_env = {**env(), "MODEL_PATH": model_path, "API_KEYS_FILE": str(tmp_path / "api-keys"),
               "PORT": str(port), "REPLICA_ID": "pod-0", "N_CTX": "1024", "N_THREADS": "1"}
    assert int(env()["PORT"]) == int(container()["ports"][0]["containerPort"])
    proc = ServerProcess([], pod_env, tmp_path / "pod.log", port=port).start()
    try:
        assert httpx.get(proc.base_url + "/live").status_code == 200
        answer = httpx.post(proc.base_url + "/v1/chat/completions", timeout=30,
                            headers={"Authorization": "Bearer change-me-to-a-long-random-key"},
                            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert answer.status_code == 200
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def model_path() -> str:
    return las.find_bundled_model()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)")
def test_haproxy_example_is_a_valid_configuration() -> None:
    result = subprocess.run(["haproxy", "-c", "-f", str(HERE / "deploy" / "haproxy" / "haproxy.cfg")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


###############################################################################
# Replicas behind nginx
###############################################################################


def replica(folder: Path, port: int, name: str, *extra: str) -> ServerProcess:
    args = ["--api-keys", KEY, "--n-ctx", "512", "--n-threads", "1", "--shutdown-grace", "20",
            "--replica-id", name, *extra]
    return ServerProcess(args, {}, folder / f"{name}-{time.monotonic_ns()}.log", port=port).start()


def start_replicas(folder: Path, n: int, *extra: str) -> tuple[list[int], list[ServerProcess]]:
    ports = [free_port() for _ in range(n)]
    return ports, [replica(folder, port, f"r{i}", *extra) for i, port in enumerate(ports)]


def wait_healthy(base: str, timeout: float = 15) -> None:
    """Until the proxy at `base` answers /health (a replica behind it does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing answered {base}/health in {timeout} s")


@contextlib.contextmanager
def nginx(folder: Path, ports: list[int]) -> Iterator[str]:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: .ci/run installs nginx-light with apt-get")
    site = (HERE / "deploy" / "nginx" / "llmapiserver.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{port} max_fails=0;\n" for port in ports)
    site = re.sub(r"(    server 10\.0\.0\.\d+:8000[^\n]*\n)+", servers, site)
    assert servers in site
    listen = free_port()
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    (folder / "site.conf").write_text(site)
    (folder / "nginx.conf").write_text(
        f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {folder};\n proxy_temp_path {folder};\n"
        f" include {folder}/site.conf;\n}}\n")
    proc = subprocess.Popen(["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its errors go to error.log
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_healthy(base)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[int], list[ServerProcess]]]:
    folder = tmp_path_factory.mktemp("replicas")
    ports, procs = start_replicas(folder, 3)
    try:
        yield folder, ports, procs
    finally:
        for proc in procs:
            proc.stop()


def rolling_restart(base: str, folder: Path, ports: list[int], procs: list[ServerProcess], settle: float,
                    *extra: str) -> tuple[list[str], list[int]]:
    """4 clients without pause (streams and JSON) while each replica in turn gets SIGTERM, exits,
    and starts again; `settle` seconds after each start. What every request ended as, and the exit codes."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    stop, results, lock = threading.Event(), [], threading.Lock()

    def user(i: int) -> None:
        while not stop.is_set():
            try:
                if i % 2:
                    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                        model="x", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=12,
                        stream=True) if chunk.choices)
                else:
                    text = client.chat.completions.create(
                        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=12).choices[0].message.content
                outcome = "ok" if text is not None else "empty"
            except Exception as exc:  # noqa: BLE001 - every failure counts
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                results.append(outcome)

    users = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for thread in users:
        thread.start()
    exit_codes = []
    try:
        time.sleep(settle)
        for index, port in enumerate(ports):  # each replica in turn: SIGTERM, wait, start again
            old = procs[index]
            old.process.send_signal(signal.SIGTERM)
            exit_codes.append(old.process.wait(40))
            old.log_file.close()
            procs[index] = replica(folder, port, f"r{index}", *extra)
            time.sleep(settle)
    finally:
        stop.set()
        for thread in users:
            thread.join(60)
    return results, exit_codes


def test_replicas_are_ready_and_live_and_tell_proxies_not_to_buffer(replicas) -> None:
    for proc in replicas[2]:
        assert httpx.get(proc.base_url + "/health").json() == {"status": "ok"}
        assert httpx.get(proc.base_url + "/live").json() == {"status": "ok"}
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.headers["x-accel-buffering"] == "no"  # nginx reads it and drops it


def test_streams_through_nginx_arrive_as_they_are_made(replicas) -> None:
    folder, ports, _ = replicas
    (folder / "stream").mkdir()
    with nginx(folder / "stream", ports) as base:
        arrivals = []
        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60, "stream": True,
                "temperature": 0, "logit_bias": {"2": -100}}
        headers = {"Authorization": f"Bearer {KEY}", "X-Request-Id": "trace-abc-123"}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
            assert response.headers["x-request-id"] == "trace-abc-123"
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
        # 60 tokens at ~1 thread take ~1 s: a buffered stream would arrive in one burst at the end.
        assert len(arrivals) > 50 and arrivals[len(arrivals) // 2] - arrivals[0] > 0.1


def test_rolling_restart_behind_nginx_loses_nothing(replicas) -> None:
    folder, ports, procs = replicas
    (folder / "rolling").mkdir()
    with nginx(folder / "rolling", ports) as base:
        results, exit_codes = rolling_restart(base, folder, ports, procs, 2)
    failures = [outcome for outcome in results if outcome != "ok"]
    print(f"rolling restart behind nginx: {len(results)} requests, {len(failures)} failed, exits {exit_codes}")
    assert exit_codes == [0, 0, 0]
    assert len(results) >= 10 and not failures, failures[:5]


def test_a_full_replicas_429_spills_to_another_behind_nginx(tmp_path: Path) -> None:
    ports, procs = start_replicas(tmp_path, 2, "--max-queue", "0")  # busy means full: 429 at once
    try:
        with nginx(tmp_path, ports) as base:
            headers = {"Authorization": f"Bearer {KEY}"}
            long = {"messages": [{"role": "user", "content": "Write an essay."}], "max_tokens": 400,
                    "logit_bias": {"2": -100}}
            busy, _ = in_thread(httpx.post, procs[0].base_url + "/v1/chat/completions", json=long, headers=headers,
                                timeout=60)  # replica 0 busy, straight to it: nginx does not know
            time.sleep(0.5)
            short = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            statuses = [httpx.post(base + "/v1/chat/completions", json=short, headers=headers, timeout=30).status_code
                        for _ in range(6)]
            busy.join(60)
        assert statuses == [200] * 6
        assert " 429 " in procs[0].log()  # some went to the full replica first, and were replayed
    finally:
        for proc in procs:
            proc.stop()


@contextlib.contextmanager
def haproxy(folder: Path, ports: list[int]) -> Iterator[str]:
    """The shipped haproxy.cfg with these replicas, and without retries: only health checks and
    DRAIN_DELAY keep requests off a stopping replica."""
    cfg = (HERE / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    listen = free_port()
    servers = "".join(f"    server replica{i} 127.0.0.1:{port} check\n" for i, port in enumerate(ports))
    cfg = re.sub(r"(    server replica\d+ 10\.0\.0\.\d+:8000 check\n)+", servers, cfg)
    assert servers in cfg
    cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{listen}").replace("retries 3", "retries 0")
    cfg = re.sub(r"\n    retry-on [^\n]*|\n    option redispatch", "", cfg)
    (folder / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(folder / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_healthy(base)
        time.sleep(4)  # every replica up in haproxy's eyes (rise 2, inter 2 s)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)")
def test_rolling_restart_behind_haproxy_with_drain_delay_and_no_retries(tmp_path: Path) -> None:
    ports, procs = start_replicas(tmp_path, 3, "--drain-delay", "3")
    try:
        with haproxy(tmp_path, ports) as base:
            results, exit_codes = rolling_restart(base, tmp_path, ports, procs, 5, "--drain-delay", "3")
    finally:
        for proc in procs:
            proc.stop()
    failures = [outcome for outcome in results if outcome != "ok"]
    print(f"rolling restart behind haproxy: {len(results)} requests, {len(failures)} failed, exits {exit_codes}")
    assert exit_codes == [0, 0, 0]
    assert len(results) >= 10 and not failures, failures[:5]
