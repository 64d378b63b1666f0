"""Key files and CURVE: private files, clear refusals, and an allow-list enforced on real TCP sockets."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from lightdist.keys import (
    AllowListAuthenticator,
    ClientKeys,
    KeyFileError,
    add_client,
    create_pool_keys,
    describe_handshake_failure,
    load_client_keys,
    load_driver_keys,
    secure_client,
    secure_server,
)
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")

QUIET_MS = 1000  # how long "the ROUTER receives nothing" is watched


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return create_pool_keys(tmp_path / "keys")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)  # closes every socket the test made (the authenticator is stopped by then)


@pytest.fixture
def server(
    ctx: zmq.Context[zmq.Socket[bytes]], files: tuple[Path, Path]
) -> Iterator[tuple[AllowListAuthenticator, zmq.Socket[bytes], str]]:
    """A started authenticator and a CURVE ROUTER bound on loopback, as the driver will have them."""
    keys = load_driver_keys(files[0])
    auth = AllowListAuthenticator(ctx, keys.allowed_clients).start()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    secure_server(router, keys)
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)
    yield auth, router, address
    auth.stop()
    router.close(linger=0)


def dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], address: str, keys: ClientKeys | None
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A DEALER connected to ``address`` (CURVE client if ``keys``), and its monitor (watching from before connect)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        secure_client(sock, keys)
    monitor = sock.get_monitor_socket()
    sock.connect(address)
    return sock, monitor


def handshake_failure(monitor: zmq.Socket[bytes], timeout_ms: int = 3000) -> str | None:
    """The first handshake failure a socket monitor reports, in words, or None by the timeout."""
    while monitor.poll(timeout_ms):
        event = recv_monitor_message(monitor)
        text = describe_handshake_failure(int(event["event"]), int(event["value"]))
        if text is not None:
            return text
    return None


# --- key files ---------------------------------------------------------------------------------


def test_files_are_private_complete_and_leave_no_temp_file(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not widen a key file
    try:
        driver_file, client_file = create_pool_keys(tmp_path / "keys")
    finally:
        os.umask(old)
    for f in (driver_file, client_file):
        assert os.stat(f).st_mode & 0o777 == 0o600, f
    assert os.stat(tmp_path / "keys").st_mode & 0o777 == 0o700
    assert sorted(os.listdir(tmp_path / "keys")) == ["client.json", "driver.json"]
    assert set(json.loads(driver_file.read_text())) == {
        "format",
        "role",
        "hmac_key",
        "curve_public",
        "curve_secret",
        "allowed_clients",
    }
    assert set(json.loads(client_file.read_text())) == {
        "format",
        "role",
        "hmac_key",
        "server_public",
        "curve_public",
        "curve_secret",
    }
    dk, ck = load_driver_keys(driver_file), load_client_keys(client_file)
    assert len(dk.hmac_key) == 32 and dk.hmac_key == ck.hmac_key
    assert ck.server_key == dk.public_key and dk.allowed_clients == {ck.public_key}
    for keys, secret in ((dk, dk.secret_key), (ck, ck.secret_key)):
        assert secret.decode() not in repr(keys) and keys.hmac_key.hex() not in repr(keys)


def test_refuses_to_overwrite_unless_asked(files: tuple[Path, Path]) -> None:
    driver_file, client_file = files
    before = driver_file.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        create_pool_keys(driver_file.parent)
    with pytest.raises(KeyFileError, match="already exists"):
        add_client(driver_file, client_file)
    assert driver_file.read_bytes() == before
    create_pool_keys(driver_file.parent, overwrite=True)
    assert driver_file.read_bytes() != before and os.stat(driver_file).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(driver_file.parent)) == ["client.json", "driver.json"]


def test_keys_create_on_an_existing_pool_names_the_flag_that_replaces_it(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from lightdist.cli import main

    driver_file, _ = files
    before = driver_file.read_bytes()
    assert main(["keys", "create", str(driver_file.parent)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "lightdist keys create --force" in err and "overwrite=True" in err, err
    assert driver_file.read_bytes() == before
    assert main(["keys", "create", "--force", str(driver_file.parent)]) == 0
    assert driver_file.read_bytes() != before and os.stat(driver_file).st_mode & 0o777 == 0o600
    assert main(["keys", "create", "--overwrite", str(driver_file.parent)]) == 0


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o606])
def test_a_file_others_can_read_or_write_is_refused(files: tuple[Path, Path], mode: int) -> None:
    for f, load in zip(files, (load_driver_keys, load_client_keys)):
        os.chmod(f, mode)
        with pytest.raises(KeyFileError, match=f"chmod 600 {f}"):
            load(f)
        os.chmod(f, 0o400)  # read-only for the owner is fine
        load(f)


def test_a_file_of_the_other_role_is_refused(files: tuple[Path, Path]) -> None:
    driver_file, client_file = files
    with pytest.raises(KeyFileError, match=f"{driver_file}: is a 'driver' key file"):
        load_client_keys(driver_file)
    with pytest.raises(KeyFileError, match=f"{client_file}: is a 'client' key file"):
        load_driver_keys(client_file)


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)  # write_text keeps the existing 0600 mode


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda doc: "{not json", "invalid JSON"),
        (lambda doc: json.dumps(doc)[:-20], "invalid JSON"),
        (lambda doc: "[]", "not a lightdist key file"),
        (lambda doc: json.dumps({**doc, "format": "other/9"}), "not a lightdist key file"),
        (lambda doc: json.dumps({**doc, "curve_secret": "~" * 40}), "'curve_secret' must be a 40-character Z85"),
        (lambda doc: json.dumps({**doc, "curve_public": zmq.curve_keypair()[0].decode()}), "not the public key"),
        (lambda doc: json.dumps({**doc, "hmac_key": "abcd"}), "'hmac_key' must be at least 32 bytes"),
        (lambda doc: json.dumps({**doc, "allowed_clients": ["short"]}), "'allowed_clients' must be a 40-character"),
        (lambda doc: json.dumps({**doc, "allowed_clients": None}), "'allowed_clients' must be a list"),
    ],
)
def test_a_corrupt_file_is_refused_naming_the_file(files: tuple[Path, Path], corrupt, problem: str) -> None:  # type: ignore[no-untyped-def]
    driver_file = files[0]
    _rewrite(driver_file, corrupt(json.loads(driver_file.read_text())))
    with pytest.raises(KeyFileError, match=str(driver_file)) as err:
        load_driver_keys(driver_file)
    assert problem in str(err.value)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=f"{tmp_path / 'nope.json'}: cannot read"):
        load_client_keys(tmp_path / "nope.json")


# --- CURVE on real sockets -----------------------------------------------------------------------


def test_an_allowed_client_talks_both_ways(ctx, server, files) -> None:  # type: ignore[no-untyped-def]
    auth, router, address = server
    d, _ = dealer(ctx, address, load_client_keys(files[1]))
    d.send(b"ping")
    assert router.poll(5000), "the allowed client's message never arrived"
    identity, body = router.recv_multipart()
    assert body == b"ping"
    router.send_multipart([identity, b"pong"])
    assert d.poll(5000) and d.recv() == b"pong"
    assert (auth.accepted, auth.denied) == (1, 0)


def test_a_client_without_curve_gets_nothing_through(ctx, server) -> None:  # type: ignore[no-untyped-def]
    auth, router, address = server
    d, monitor = dealer(ctx, address, None)
    d.send(b"plain", zmq.NOBLOCK)  # no error: the frame just queues in the DEALER
    assert not router.poll(QUIET_MS)
    assert "one side uses CURVE" in str(handshake_failure(monitor))
    assert auth.denied == 0  # a mechanism mismatch ends the handshake before ZAP is asked


def test_a_wrong_client_keypair_is_denied_and_counted(ctx, server, files, caplog) -> None:  # type: ignore[no-untyped-def]
    auth, router, address = server
    good = load_client_keys(files[1])
    public, secret = zmq.curve_keypair()
    stranger = ClientKeys(Path("-"), good.hmac_key, good.server_key, public, secret)
    with caplog.at_level(logging.WARNING, logger="lightdist"):
        d, monitor = dealer(ctx, address, stranger)
        d.send(b"let me in", zmq.NOBLOCK)
        assert not router.poll(QUIET_MS)
        assert wait_until(lambda: auth.denied == 1, 3.0)
        assert "refused this client's CURVE key" in str(handshake_failure(monitor))
    assert auth.accepted == 0
    assert any("127.0.0.1" in r.getMessage() and public.decode() in r.getMessage() for r in caplog.records)
    # the hints on both sides name the command that makes a client file, not a Python function
    assert "`lightdist keys add-client DRIVER_FILE NEW_CLIENT_FILE`" in str(
        describe_handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    )
    assert all("add_client" not in r.getMessage() and "keys add-client" in r.getMessage() for r in caplog.records)


def test_add_client_then_updating_the_allow_list_admits_the_new_client(ctx, server, files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    auth, router, address = server
    driver_file = files[0]
    new_file = tmp_path / "agent2.json"
    add_client(driver_file, new_file)
    assert os.stat(new_file).st_mode & 0o777 == 0o600 and os.stat(driver_file).st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(driver_file.parent) if n.endswith(".tmp")]
    # the running authenticator still has the old list: the new key is refused
    early, _ = dealer(ctx, address, load_client_keys(new_file))
    early.send(b"too early", zmq.NOBLOCK)
    assert wait_until(lambda: auth.denied == 1, 3.0)
    auth.allowed = load_driver_keys(driver_file).allowed_clients
    assert len(auth.allowed) == 2
    # libzmq never retries a connection refused by ZAP: the client makes a new socket
    for f in (new_file, files[1]):
        d, _ = dealer(ctx, address, load_client_keys(f))
        d.send(f.name.encode())
        assert router.poll(5000), f"{f.name} was not admitted"
        assert router.recv_multipart()[1] == f.name.encode()
    assert (auth.accepted, auth.denied) == (2, 1)
    assert not router.poll(100)  # and the refused socket's frame stays refused


def test_without_an_authenticator_a_server_admits_nobody(ctx, files) -> None:  # type: ignore[no-untyped-def]
    router = ctx.socket(zmq.ROUTER)
    secure_server(router, load_driver_keys(files[0]))
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)
    d, monitor = dealer(ctx, address, load_client_keys(files[1]))  # the right keys
    d.send(b"hello", zmq.NOBLOCK)
    assert not router.poll(QUIET_MS)  # ZAP_ENFORCE_DOMAIN: no handler means no entry, not open doors
    assert "security handshake failed" in str(handshake_failure(monitor))


def test_keys_must_be_set_before_bind_or_connect(ctx, files) -> None:  # type: ignore[no-untyped-def]
    router, d = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind(f"tcp://127.0.0.1:{free_port()}")
    d.connect(f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match="before the socket's first bind"):
        secure_server(router, load_driver_keys(files[0]))
    with pytest.raises(RuntimeError, match="before the socket's first connect"):
        secure_client(d, load_client_keys(files[1]))


def test_authenticator_lifecycle(ctx) -> None:  # type: ignore[no-untyped-def]
    auth = AllowListAuthenticator(ctx, []).start()
    assert [t for t in threading.enumerate() if t.name == "lightdist-zap"]
    with pytest.raises(RuntimeError, match="one authenticator per context"):
        AllowListAuthenticator(ctx, []).start()
    auth.stop()
    auth.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "lightdist-zap"]
    with pytest.raises(RuntimeError, match="starts once"):
        auth.start()
    again = AllowListAuthenticator(ctx, []).start()  # the ZAP endpoint was released
    again.stop()
