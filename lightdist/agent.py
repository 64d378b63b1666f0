"""``lightdist agent``: attach this host's ranks to a driver's pool.

::

    lightdist agent --connect tcp://DRIVER:PORT --key-file pool.client.key --nproc-per-node 2

One agent per host, started however the cluster starts things (``srun --ntasks-per-node=1``, a pod
per node, ssh, Ray). It connects to the driver, says HELLO with this host's facts, receives its rank
range and settings (ASSIGN), and forks its ranks with the same template process a single-host pool
uses, so a rank that dies on a healthy host is respawned in place. The ranks connect to the driver
themselves; the agent relays their exits (HOST_EVENT) and their output (OUTPUT, prefixed
``[host rank N]``, within a credit window: see :mod:`lightdist._host_output`), signals them on
request (KILL) and answers the driver's heartbeat. If the driver is silent for the lease the agent
kills its ranks and exits: a dead driver takes every host down. A driver that declared this host
lost answers FENCED: the agent kills its ranks and exits, so a healed host never rejoins an old
generation; a driver that refuses this host's name (a live agent holds it) answers REFUSED. Stopped
by SIGTERM, the agent tells the driver it leaves before it stops its ranks.

Launcher variables (``SLURM_*``, torchrun's ``RANK``/``WORLD_SIZE``/...) are read as hints for
placement only and removed before the ranks start: the pool's layout is the only truth.

The exit status tells a launcher whether to start the agent again (``EXIT_*``, docs/multinode.md):
0 the pool was stopped; 2 bad arguments or key file, or a host name a live agent holds (REFUSED:
pass --host-name); 75 (``EX_TEMPFAIL``) the pool failed or went away (its start failed, it broke,
this host was declared lost, the driver fell silent): start it again to attach to the pool's next
start or as a spare; 77 (``EX_NOPERM``) the driver refused its keys; 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

import zmq

from lightdist import _messages as messages
from lightdist._host_output import OutputForwarder
from lightdist._launcher_env import LAUNCHER_VARIABLES, node_hint, route_interface, scrub_launcher_environment
from lightdist._messages import AGENT_PREFIX, Assignment, HostEvent, RankBoot
from lightdist._procs import RankExit, TemplateProcess
from lightdist.protocol import Kind, Session
from lightdist.transport import Channel

__all__ = [
    "EXIT_REFUSED",
    "EXIT_RETRY",
    "EXIT_STOPPED",
    "LAUNCHER_VARIABLES",
    "Agent",
    "main",
    "route_interface",
]

log = logging.getLogger("lightdist")
# Exit statuses (sysexits.h where one fits), so a launcher knows whether to restart the agent.
EXIT_STOPPED = 0  # the driver stopped the pool: the job is done (2: bad arguments or key file, as argparse)
EXIT_RETRY = 75  # EX_TEMPFAIL: the pool failed or went away; a restarted agent attaches to the next one
EXIT_REFUSED = 77  # EX_NOPERM: the driver refused this agent's keys: fix the key file
AGENT_RANK = -2
CONNECT_TIMEOUT_S = 300.0  # waiting for the driver to come up (srun may start agents first)
HANGUP_GIVE_UP_S = 4.0  # handshakes that keep failing without a reason: give up (see _handshake_failure)


class Agent:
    """One host's agent. ``run()`` returns the process exit status."""

    def __init__(
        self,
        connect: str,
        hmac_key: bytes,
        nproc: int,
        curve: Any = None,
        host: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        extra_facts: dict[str, Any] | None = None,
        prog: str = "lightdist agent",
    ) -> None:
        self.connect = connect
        self.prog = prog  # how messages name this command (`lightdist worker` runs an Agent too)
        self.extra_facts = dict(extra_facts or {})
        self.nproc = nproc
        self.curve = curve
        self.host = host or socket.gethostname()
        self.connect_timeout = connect_timeout
        self.sender = f"{AGENT_PREFIX}{self.host}.{secrets.token_hex(6)}"
        self.session = Session(hmac_key, sender=self.sender, rank=AGENT_RANK)
        self.session.accept_from("driver")
        self.generation = 0
        self.lease = connect_timeout  # until ASSIGN says otherwise
        self.template: TemplateProcess | None = None
        self._spawns: queue.SimpleQueue[RankBoot | None] = queue.SimpleQueue()
        self._spawner: threading.Thread | None = None
        self.local_ip, self.ifname = route_interface(connect)
        self._context = zmq.Context()
        self._monitor: zmq.Socket[bytes] | None = None
        self._hangups_since: float | None = None
        self._attached = False
        # Why this agent leaves on its own (told to the driver, which then need not wait for the
        # heartbeat to miss it); None once the driver ended it (EXIT, FENCED, REFUSED) or is gone.
        self.leaving: str | None = "the agent stopped"
        self._output = OutputForwarder(self._send_output)
        self.channel = Channel.connect_dealer(
            self._context, connect, self.sender.encode(), self.session, curve=curve, before_connect=self._attach_monitor
        )

    def _attach_monitor(self, sock: zmq.Socket[bytes]) -> None:
        # A refused CURVE client raises nothing (its sends just queue): watch the handshake instead.
        events = (
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self._monitor = sock.get_monitor_socket(events)

    def _handshake_failure(self) -> str | None:
        from zmq.utils.monitor import recv_monitor_message

        from lightdist.keys import describe_handshake_failure

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if int(event["event"]) == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # A peer that hung up mid-handshake: a proxy, a driver restarting (ZMQ reconnects), or
                # a driver with another pool's keys, which looks the same from here. Final only if
                # it keeps happening.
                now = time.monotonic()
                self._hangups_since = self._hangups_since or now
                if now - self._hangups_since > HANGUP_GIVE_UP_S:
                    return (
                        f"every security handshake failed for {HANGUP_GIVE_UP_S:.0f} s: the driver uses "
                        "other keys (another pool's client file?) or is not a lightdist driver"
                    )
                continue
            text = describe_handshake_failure(int(event["event"]), int(event["value"]))
            if text is not None:
                return text
        return None

    def run(self) -> int:
        try:
            return self._serve()
        finally:
            self._shutdown()

    def _serve(self) -> int:
        self._hello()
        last_heard = time.monotonic()
        last_hello = last_heard
        while True:
            now = time.monotonic()
            if now - last_heard > self.lease:
                self.leaving = None
                self._say(f"no word from the driver for {self.lease:.1f} s; stopping this host's ranks")
                return EXIT_RETRY
            if self.generation == 0 and now - last_hello > 2.0:
                self._hello()  # the driver may have restarted its pool
                last_hello = now
            select.select([self.channel.fd, self.channel.waker.fd], [], [], 0.25)
            self.channel.waker.clear()
            if self.generation == 0:
                refused = self._handshake_failure()  # only a definite refusal: see _handshake_failure
                if refused is not None:
                    self._say(f"cannot attach to {self.connect}: {refused}")
                    return EXIT_REFUSED
            for _, msg in self.channel.drain():
                last_heard = time.monotonic()
                if not self._attached:  # the driver heard our HELLO: it pings or assigns
                    self._attached = True
                    self._say(f"attached to {self.connect} as host {self.host!r} ({self.nproc} ranks)")
                status = self._handle(msg.kind, msg.header.call, msg.payload)
                if status is not None:
                    return status

    def _hello(self) -> None:
        facts = {
            "host": self.host,
            "nproc": self.nproc,
            "pid": os.getpid(),
            "ip": self.local_ip,
            "ifname": self.ifname,
            "node_hint": node_hint(dict(os.environ)),
            **self.extra_facts,
        }
        self.channel.send(Kind.HELLO, 0, [messages.encode_hello(facts)])

    def _handle(self, kind: Kind, call: int, payload: tuple[bytes, ...]) -> int | None:
        if kind is Kind.PING:
            self.channel.send(Kind.PONG, self.generation, list(payload))  # echoes the PING's number
        elif kind is Kind.ASSIGN:
            self._assign(call, messages.decode_assign(payload[0]))
        elif kind is Kind.SPAWN:
            boot = messages.decode_spawn(payload[0])
            if self.curve is not None:
                boot = dataclasses.replace(boot, curve=self.curve)  # the rank connects with this host's client keys
            # Handed to a thread: the template reads its pipe only once its imports are done, so a
            # large bootstrap (setup kwargs) would block this loop and the heartbeat with it.
            self._spawns.put(boot)
        elif kind is Kind.KILL:
            order = messages.decode_kill(payload[0])
            if self.template is not None:
                self.template.signal_ranks(order.signal, order.ranks)
        elif kind is Kind.CREDIT:
            self._output.credit(*messages.decode_credit(payload[0]))
        elif kind is Kind.EXIT:
            self.leaving = None
            failure = messages.decode_farewell(payload[0]) if payload else None
            if failure is None:
                return EXIT_STOPPED
            self._say(f"the pool failed: {failure}")
            return EXIT_RETRY
        elif kind is Kind.FENCED:
            self.leaving = None
            self._say("the driver declared this host lost; stopping its ranks")
            return EXIT_RETRY
        elif kind is Kind.REFUSED:
            self.leaving = None
            self._say(f"cannot attach to {self.connect}: {messages.decode_refused(payload)}")
            return 2  # as for bad arguments: this agent needs its own --host-name
        return None

    def _say(self, line: str) -> None:
        print(f"{self.prog}: {line}", file=sys.stderr, flush=True)

    def _assign(self, generation: int, settings: Assignment) -> None:
        self.generation = generation
        self.lease = settings.lease_s
        scrub_launcher_environment()
        if self.ifname:  # unless the user chose already
            os.environ.setdefault("GLOO_SOCKET_IFNAME", self.ifname)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", self.ifname)
        if self.template is None:
            self.template = TemplateProcess(
                settings.imports,
                settings.cwd,
                self._rank_exited,
                self._template_lost,
                on_spawned=self._rank_spawned,
                host=self.host,
                output=self._output.forward,  # to the driver, prefixed [host rank N]
            )
            self._spawner = threading.Thread(target=self._spawn_loop, name="lightdist-agent-spawn", daemon=True)
            self._spawner.start()
        if settings.ranks:
            self._say(f"host {self.host!r} runs ranks {_span(settings.ranks)} (node {settings.node_rank})")
        else:
            self._say(f"host {self.host!r} is a spare: it takes over the ranks of a host that is lost")

    def _spawn_loop(self) -> None:
        while (boot := self._spawns.get()) is not None:
            assert self.template is not None
            try:
                self.template.spawn(boot.rank, boot)
            except OSError as error:  # the template is gone; its monitor reports it
                log.warning("cannot spawn rank %s: %s", boot.rank, error)

    def _event(self, event: HostEvent) -> None:
        self.channel.send(Kind.HOST_EVENT, self.generation, [messages.encode_host_event(event)])

    def _rank_spawned(self, rank: int, pid: int, sender: str) -> None:  # template monitor thread
        self._event(HostEvent("spawned", rank=rank, pid=pid, sender=sender))

    def _rank_exited(self, info: RankExit) -> None:  # template monitor thread
        self._event(
            HostEvent("exit", rank=info.rank, pid=info.pid, sender=info.sender, code=info.exitcode, signal=info.signal)
        )

    def _template_lost(self, detail: str) -> None:
        self._event(HostEvent("lost", detail=detail))

    def _send_output(self, stream: str, text: str) -> None:  # the template's output thread
        try:
            self.channel.send(Kind.OUTPUT, self.generation, messages.encode_output(stream, text))
        except zmq.ZMQError:
            pass  # the channel closed under a late write: output is best effort

    def _shutdown(self) -> None:
        linger = 0
        if self.leaving is not None and self._attached:
            # Before the ranks go: their exits must not read as failures of a host still in the pool.
            self._event(HostEvent("left", detail=self.leaving))
            linger = 1000
        if self._spawner is not None:
            self._spawns.put(None)
            self._spawner.join(timeout=5)
        if self.template is not None:
            self.template.signal_ranks(signal.SIGKILL)
            self.template.close(grace=2.0)
        self._output.close()
        if self._monitor is not None:
            self.channel.socket.disable_monitor()
            self._monitor.close(linger=0)
        self.channel.close(linger_ms=linger)
        self._context.term()


def _span(ranks: list[int]) -> str:
    """``0-3`` for a contiguous range, else the list."""
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightdist agent", description="Attach this host's ranks to a pool.")
    parser.add_argument("--connect", required=True, metavar="tcp://DRIVER:PORT", help="the driver's address")
    parser.add_argument("--key-file", required=True, help="the pool's client key file (see docs/multinode.md)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this host (one per GPU)")
    parser.add_argument("--host-name", default=None, help="this host's name in messages (default: hostname)")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        help="seconds to wait for the driver to assign this host its ranks",
    )
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be at least 1")
    return _run(args.connect, args.key_file, args.nproc_per_node, args.host_name, args.connect_timeout)


def _run(
    connect: str,
    key_file: str,
    nproc: int,
    host: str | None,
    connect_timeout: float,
    facts: dict[str, Any] | None = None,
    prog: str = "lightdist agent",
) -> int:
    if not connect.startswith("tcp://") or ":" not in connect[6:]:
        print(f"{prog}: error: --connect {connect!r}: expected tcp://HOST:PORT", file=sys.stderr)
        return 2
    from lightdist.keys import load_client_keys

    try:
        keys = load_client_keys(key_file)
    except (OSError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    agent = Agent(
        connect,
        keys.hmac_key,
        nproc,
        curve=keys,
        host=host,
        connect_timeout=connect_timeout,
        extra_facts=facts,
        prog=prog,
    )

    def stop(*_: Any) -> None:  # srun / kubelet / torchrun stop: clean up the ranks, tell the driver
        agent.leaving = "its agent was stopped by SIGTERM"
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    return agent.run()
