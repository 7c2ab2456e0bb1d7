"""Deploy the app on this machine: a SuperLink, N SuperNodes and `flwr run`, all stopped at the end.

    python scripts/deploy.py num_rounds=2                       # 2 sites, plain HTTP (quickest)
    python scripts/deploy.py --sites 3 --tls strategy=uniform   # TLS with a throw-away CA
    python scripts/deploy.py --auth                             # TLS + SuperNode authentication

Positional arguments are Hydra overrides, as for `a2v-run`. The run folder is
<output_root>/<date>/<time>_<name>_deploy; process logs, certificates, keys and each process's
FLWR_HOME go to <run folder>/deploy unless --work-dir says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from a2v_flower import config as C
from a2v_flower import preflight
from a2v_flower.processes import become_subreaper, reap_orphans, stop_processes
from a2v_flower.run import REFUSALS, REFUSED, flwr_env, outcome, stage_app

CONNECTION = "deploy"  # name of the SuperLink connection written to the CLI's config.toml
HOSTS = ("127.0.0.1", "localhost")  # names the TLS server certificate is valid for


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pem(path: Path, data: bytes) -> Path:
    """Write key or certificate bytes, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_certs(folder: Path, hosts=HOSTS, days: int = 30) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for `hosts`, signed by it: (ca.crt, server.crt, server.key)."""
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a2v_flower deployment CA")])
    now = datetime.datetime.now(datetime.timezone.utc)

    def sign(subject: x509.Name, public_key, extensions: list[tuple[x509.ExtensionType, bool]]):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=days)))
        for ext, critical in [(x509.SubjectKeyIdentifier.from_public_key(public_key), False),
                              (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
                              *extensions]:
            builder = builder.add_extension(ext, critical)
        return builder.sign(ca_key, hashes.SHA256())

    # key usage and key identifiers: strict verifiers (Python >= 3.13's default) reject a CA without them
    ca = sign(ca_name, ca_key.public_key(), [(x509.BasicConstraints(ca=True, path_length=0), True), (x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), True)])
    server = sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), key.public_key(), [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName([subject_name(h) for h in hosts]), False)])
    pem = serialization.Encoding.PEM
    return (write_pem(folder / "ca.crt", ca.public_bytes(pem)),
            write_pem(folder / "server.crt", server.public_bytes(pem)),
            write_pem(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption())))


def subject_name(host: str) -> x509.GeneralName:
    """An IP address or DNS name entry for a certificate's subjectAltName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_node_key(path: Path) -> Path:
    """An EC P-384 key pair in OpenSSH format, as Flower's SuperNode auth wants; returns the .pub path."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_pem(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
    return write_pem(path.with_suffix(".pub"), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def write_connection(flwr_home: Path, port: int, ca: Path | None) -> None:
    """The CLI's config.toml with one SuperLink connection, the default one."""
    security = f'root-certificates = "{ca}"' if ca else "insecure = true"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                           f'address = "127.0.0.1:{port}"\n{security}\n')


def start(cmd: list[str], home: Path, log: Path) -> subprocess.Popen:
    """Start a Flower process in `home` (its FLWR_HOME) and a process group of its own, output into `log`."""
    home.mkdir(parents=True, exist_ok=True)
    env = flwr_env() | {"FLWR_HOME": str(home)}
    with open(log, "ab") as out:  # the child keeps its own handle
        # own group: Ctrl-C reaches only this script, which then stops the processes itself, in order
        return subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM `procs` and every process they started (by PID, psutil), SIGKILL what is left after `grace` s."""
    stop_processes([p.pid for p in procs], grace)
    for p in procs:
        p.wait()


def flwr_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a `flwr` CLI command against the connection in `home`/config.toml."""
    env = flwr_env() | {"FLWR_HOME": str(home)}
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)


def wait_until(what: str, ready, procs: list[subprocess.Popen], timeout: float) -> None:
    """Poll `ready()` until true; fail early if one of `procs` died, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {'exited: ' + str(dead) if dead else f'not ready after {timeout:.0f} s'}")
        time.sleep(0.5)


class SuperNode(NamedTuple):
    """A SuperNode this script started: its partition, process, log, and the CA it trusts (None: --insecure)."""

    site: int
    proc: subprocess.Popen
    log: Path
    ca: Path | None


def log_tail(path: Path, lines: int = 12) -> str:
    """The last `lines` lines of a log file, indented."""
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(f"    {line}" for line in text[-lines:])


def dead(nodes: list[SuperNode]) -> list[str]:
    """A report (exit code, log tail) for each SuperNode that has exited."""
    return [f"SuperNode {n.site} (partition-id={n.site}) died with exit code {n.proc.returncode}; last lines of "
            f"{n.log}:\n{log_tail(n.log)}" for n in nodes if n.proc.poll() is not None]


def tls_mismatch(port: int, ca: Path | None) -> str | None:
    """Why a SuperNode trusting `ca` (None: --insecure) cannot talk to the SuperLink on `port`, if TLS is why."""
    probe = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:  # only asking whether the SuperLink speaks TLS at all
        probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with probe.wrap_socket(raw, server_hostname="127.0.0.1"):
                tls = True
    except ssl.SSLCertVerificationError as err:
        return (f"the SuperLink's TLS certificate does not verify against {ca} ({err.verify_message}): give the "
                "SuperNode the CA that signed it (--root-certificates)")
    except (ssl.SSLError, ConnectionResetError):
        tls = False  # a plain-HTTP server cannot answer a TLS handshake
    except OSError:  # nothing answers there: not a TLS question
        return None
    if tls and ca is None:
        return ("the SuperLink speaks TLS but the SuperNode was started with --insecure: start it with "
                "--root-certificates <ca.crt> instead")
    if not tls and ca is not None:
        return ("the SuperNode expects TLS (--root-certificates) but the SuperLink was started with --insecure: "
                "start both with TLS, or both with --insecure")
    return None


def wait_for_supernodes(cli_home: Path, port: int, nodes: list[SuperNode], link: subprocess.Popen,
                        timeout: float = 120) -> None:
    """Until the SuperLink (process `link`) lists every node online; fail early, with the reason, when one
    died or cannot connect because of TLS, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while online_nodes(cli_home) < len(nodes):
        problems = dead(nodes) + [f"SuperNode {n.site} cannot connect to the SuperLink on 127.0.0.1:{port}: {why}"
                                  for n in nodes if "Connection attempt failed" in log_tail(n.log)
                                  and (why := tls_mismatch(port, n.ca))]
        if link.poll() is not None:
            problems.append(f"flower-superlink exited with code {link.returncode}")
        if problems or time.monotonic() > deadline:
            raise RuntimeError("; ".join(problems) or f"{len(nodes)} SuperNodes not online after {timeout:.0f} s")
        time.sleep(1)


def online_nodes(cli_home: Path) -> int:
    """How many SuperNodes the SuperLink lists as online."""
    out = flwr_cli(cli_home, "supernode", "list", CONNECTION, "--format", "json")
    try:
        return sum(n["status"] == "online" for n in json.loads(out.stdout)["nodes"])
    except (ValueError, KeyError):
        return 0


def prepare_config(overrides: list[str], sites: int) -> tuple[Path, Path]:
    """Compose, validate and save the config for `sites` sites; return (run folder, config file)."""
    conf = C.checked([*overrides, f"federation.num_sites={sites}"], Path.cwd())
    preflight.check_run(conf)  # a bad value, partition or checkpoint fails here, before anything is written
    run_dir = Path(f"{C.run_dir_for(conf)}_deploy")
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(C.to_yaml(conf))
    return run_dir, run_dir / "config.yaml"


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def superlink_command(port: int, certs: tuple[Path, Path, Path] | None, auth: bool) -> list[str]:
    """flower-superlink serving Fleet, Control and Runtime APIs on one port; TLS when `certs` (ca, cert, key)."""
    cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs:
        ca, cert, key = certs
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    else:
        cmd += ["--insecure"]
    return cmd + (["--enable-supernode-auth"] if auth else [])  # Flower accepts auth only with TLS


def supernode_command(site: int, sites: int, port: int, ca: Path | None, key: Path | None) -> list[str]:
    """flower-supernode for partition `site` of `sites`; trusts `ca` (else insecure), signs with `key` if given."""
    cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),  # its own API
           "--node-config", f"partition-id={site} num-partitions={sites}"]
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    return cmd + (["--auth-supernode-private-key", str(key)] if key else [])


def register(cli_home: Path, key: Path, name: str) -> Path:
    """Make an EC key pair at `key` and register its public half with the SuperLink; return `key`."""
    pub = make_node_key(key)
    reg = flwr_cli(cli_home, "supernode", "register", str(pub), CONNECTION, "--name", name)
    if reg.returncode != 0:
        raise RuntimeError(f"flwr supernode register {pub} failed: {reg.stdout}{reg.stderr}")
    return key


def deploy(args: argparse.Namespace, work: Path, config_file: Path, procs: list[subprocess.Popen],
           launch_id: str) -> int:
    """Start the SuperLink and SuperNodes (appended to `procs`), run the app while watching the SuperNodes;
    return `flwr run`'s exit code."""
    port, cli_home = free_port(), work / "cli"
    certs = make_certs(work / "certs") if args.tls else None
    ca = certs[0] if certs else None
    write_connection(cli_home, port, ca)
    procs.append(start(superlink_command(port, certs, args.auth), work / "superlink", work / "superlink.log"))
    wait_until("flower-superlink", lambda: listening(port), procs, 60)
    print(f"SuperLink on 127.0.0.1:{port} ({'TLS' if args.tls else 'insecure'}"
          f"{', SuperNode auth' if args.auth else ''}); logs in {work}", flush=True)
    nodes = []
    for i in range(args.sites):
        key = register(cli_home, work / "keys" / f"site-{i}", f"site-{i}") if args.auth else None
        log = work / f"supernode-{i}.log"
        procs.append(start(supernode_command(i, args.sites, port, ca, key), work / f"supernode-{i}", log))
        nodes.append(SuperNode(i, procs[-1], log, ca))
    wait_for_supernodes(cli_home, port, nodes, procs[0])
    run = ["flwr", "run", str(stage_app(work / "app")), CONNECTION, "--stream",
           "--run-config", f"config-file='{config_file}' launch-id='{launch_id}'"]
    flwr = subprocess.Popen(run, env=flwr_env() | {"FLWR_HOME": str(cli_home)})
    deadline, reported = time.monotonic() + args.timeout, 0
    while flwr.poll() is None:  # a SuperNode that dies is reported at once; the server decides whether to go on
        for report in (deaths := dead(nodes))[reported:]:
            print(report, file=sys.stderr, flush=True)
        reported = len(deaths)
        reap_orphans({p.pid for p in [*procs, flwr]})  # exited ClientApps re-parented to this script
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(run, args.timeout)
        time.sleep(1)
    return flwr.returncode


def report(run_dir: Path, line: str) -> None:
    """Print the final line (accuracy, failed sites) and the last evaluation's top-1 per site."""
    evals = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    sites = {s: round(m["top1"], 3) for s, m in evals[-1].get("sites", {}).items()} if evals else {}
    print(f"{line}; top-1 per site {sites}")
    print(f"outputs in {run_dir}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: deployment options, then Hydra overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. num_rounds=3 strategy=uniform")
    p.add_argument("--sites", type=int, default=2, help="SuperNodes to start (sets federation.num_sites)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--insecure", action="store_true", help="plain HTTP between all processes (default)")
    mode.add_argument("--tls", action="store_true", help="TLS with a self-signed CA made for 127.0.0.1/localhost")
    p.add_argument("--auth", action="store_true",
                   help="SuperNode authentication: an EC key per SuperNode, registered with `flwr supernode "
                        "register`; implies --tls (Flower refuses it without)")
    p.add_argument("--work-dir", help="logs, certificates, keys and FLWR_HOMEs (default: <run folder>/deploy)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds `flwr run` may take (default 3600)")
    args = p.parse_args(argv)
    if args.auth and args.insecure:
        p.error("--auth needs TLS; drop --insecure")
    args.tls = args.tls or args.auth
    if any(o.lstrip("+").startswith("federation.num_sites=") for o in args.overrides):
        p.error("set the number of sites with --sites, not federation.num_sites")
    if args.sites < 1:
        p.error(f"--sites={args.sites}: need at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Validate the config, deploy, run, report; always stop what was started."""
    args = parse_args(argv)
    try:
        run_dir, config_file = prepare_config(args.overrides, args.sites)
    except REFUSALS as e:  # nothing started or written yet
        print(f"deploy.py: {' '.join(str(e).split())}", file=sys.stderr)
        return REFUSED
    work = Path(args.work_dir or run_dir / "deploy").resolve()
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops like Ctrl-C: through `finally`
    become_subreaper()  # the SuperLink's detached flower-superexec and its ServerApp stay findable by PID
    procs: list[subprocess.Popen] = []
    launch_id = uuid.uuid4().hex[:12]
    try:
        code = deploy(args, work, config_file, procs, launch_id)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"deployment failed: {e}", file=sys.stderr)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        print(f"stopped {stop_processes()} Flower processes", file=sys.stderr, flush=True)
    summary_file = run_dir / "summary.json"
    ok, line = outcome(json.loads(summary_file.read_text()) if summary_file.is_file() else {}, launch_id, code)
    if not ok:
        print(f"deployment {line}; logs in {work}", file=sys.stderr)
        return code or 1
    report(run_dir, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
