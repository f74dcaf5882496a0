"""Execute in its own network namespace, joined to infer by one veth pair and nothing else.

The Knative NetworkPolicies give execute a route to infer only; this shows the same shape on
one machine: infer on the host side of the veth, execute in a namespace whose only link is the
veth. (a) a run with sub-calls completes through the callback URL at infer's veth address;
(b) from execute's namespace, a listener on the host's loopback and one on another host address
are unreachable while infer is, and with nftables in the namespace (as a NetworkPolicy does in
a cluster) so is every other port on infer's own address; (c) the guest cannot open a socket to
infer either. Needs root (CAP_NET_ADMIN) and iproute2's `ip`; skipped otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from functions.testing.haystack import haystack
from tests.conftest import Served, free_port, infer_env, serve


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    if os.geteuid() != 0:
        return "not root: creating a network namespace and a veth pair needs CAP_NET_ADMIN"
    probe = f"rlm-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed (no CAP_NET_ADMIN here?): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Namespaced:
    name: str
    host_ip: str  # infer's side of the veth
    ns_ip: str  # execute's side
    infer: Served
    execute: Served
    filtered: bool  # nftables in the namespace admits only infer's port (where nft exists)

    def connect(self, host: str, port: int) -> str:
        """Try a TCP connection from inside execute's namespace: 'ok' or the error's name."""
        code = (
            "import socket, sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout=3).close(); print('ok')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        done = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        return done.stdout.strip() or done.stderr.strip()


@pytest.fixture(scope="module")
def netns(tmp_path_factory, scripted_llm) -> Iterator[Namespaced]:
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    name, host_if, ns_if = f"rlm-{tag}", f"vh{tag}", f"vn{tag}"
    subnet = f"10.251.{random.randrange(256)}.{4 * random.randrange(64)}"
    base = subnet.rsplit(".", 1)
    host_ip, ns_ip = f"{base[0]}.{int(base[1]) + 1}", f"{base[0]}.{int(base[1]) + 2}"
    tmp = tmp_path_factory.mktemp("netns")
    started: list[Served] = []
    ip("netns", "add", name)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        port = free_port()
        callbacks = {"EXECUTE_CALLBACK_ORIGINS": f"http://{host_ip}:{port}/subcalls"}
        execute = serve("execute", callbacks, tmp, ready="/health/readiness", host=ns_ip,
                        prefix=["ip", "netns", "exec", name])  # fmt: skip
        started.append(execute)
        filtered = _only_infers_port(name, host_ip, port)
        env = infer_env(scripted_llm, execute.url, port)
        env["INFER_CALLBACK_URL"] = f"http://{host_ip}:{port}"
        infer = serve("infer", env, tmp, port=port, host=host_ip)
        started.append(infer)
        yield Namespaced(name, host_ip, ns_ip, infer, execute, filtered)
    finally:
        for served in reversed(started):
            served.stop()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the veth too
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def _only_infers_port(namespace: str, infer_ip: str, infer_port: int) -> bool:
    """What a NetworkPolicy does in a cluster, with nftables: inside execute's namespace, new
    outbound connections only to infer's sub-call port; False where there is no `nft`."""
    if shutil.which("nft") is None:
        return False
    rules = f"""table inet rlm {{
        chain out {{
            type filter hook output priority 0; policy drop;
            ct state established,related accept
            oifname "lo" accept
            ip daddr {infer_ip} tcp dport {infer_port} accept
            meta l4proto tcp reject with tcp reset
            reject
        }}
    }}"""
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=rules,
                   check=True, capture_output=True, text=True)  # fmt: skip
    return True


def test_a_run_with_sub_calls_completes_across_the_veth(netns, llm):
    question = {"query": "What is the magic number?", "context": haystack(300_000, 4711)}
    r = httpx.post(netns.infer.url + "/infer", json=question, timeout=120)
    body = r.json()
    assert r.status_code == 200 and body["answer"] == "4711", body
    assert body["usage"]["scripted-sub"]["calls"] >= 3  # llm_query_batched, via the callback


def _listener(host: str) -> socket.socket:
    s = socket.socket()
    s.bind((host, 0))
    s.listen()
    return s


def _other_host_address(exclude: str) -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout  # fmt: skip
    found = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return next((a for a in found if a != exclude), None)


def test_from_executes_namespace_only_infer_is_reachable(netns):
    infer_port = int(netns.infer.url.rsplit(":", 1)[1])
    assert netns.connect(netns.host_ip, infer_port) == "ok"
    with _listener("127.0.0.1") as local:
        assert netns.connect("127.0.0.1", local.getsockname()[1]) == "ConnectionRefusedError"
        assert httpx.get(netns.infer.url + "/health", timeout=10).status_code == 200
    other = _other_host_address(netns.host_ip)
    if other is None:
        pytest.skip("the host has no other global IPv4 address to try")
    with _listener(other) as outside:
        assert netns.connect(other, outside.getsockname()[1]) != "ok"  # no route out of the ns


def test_on_infers_own_address_only_its_sub_call_port_is_open(netns):
    if not netns.filtered:
        pytest.skip("no `nft` (install nftables) to admit only infer's port in the namespace")
    with _listener(netns.host_ip) as beside_infer:  # same host, same address, another port
        assert (
            netns.connect(netns.host_ip, beside_infer.getsockname()[1]) == "ConnectionRefusedError"
        )
    infer_port = int(netns.infer.url.rsplit(":", 1)[1])
    assert netns.connect(netns.host_ip, infer_port) == "ok"


def test_the_guest_cannot_reach_infer(netns):
    infer_port = int(netns.infer.url.rsplit(":", 1)[1])
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({netns.host_ip!r}, {infer_port}), timeout=3)\n"
        "    print('connected')\n"
        "except Exception as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    r = httpx.post(netns.execute.url + "/execute", json={"code": code}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["stdout"].startswith("refused"), r.json()
