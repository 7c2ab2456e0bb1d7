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
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from omegaconf import OmegaConf

from a2v_flower import config as C
from a2v_flower.data.site import federation
from a2v_flower.run import APP_DIR, flwr_env

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


def spawned(work: Path) -> list[int]:
    """Live processes with FLWR_HOME under `work`: all a deployment started, re-parented ones too (Linux /proc)."""
    marker, pids = f"FLWR_HOME={work}{os.sep}".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def stop(procs: list[subprocess.Popen], work: Path, grace: float = 10.0) -> None:
    """SIGTERM the process groups in `procs` and every process with FLWR_HOME under `work`; SIGKILL what is left
    after `grace` seconds. The groups hold the SuperNodes' ClientApps; the SuperLink starts its flower-superexec
    (parent of the ServerApp) in a session of its own, so only FLWR_HOME finds it and the ServerApp."""
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for pid in spawned(work):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (any(p.poll() is None for p in procs) or spawned(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in [p.pid for p in procs if p.poll() is None] + spawned(work):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
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


def online_nodes(cli_home: Path) -> int:
    """How many SuperNodes the SuperLink lists as online."""
    out = flwr_cli(cli_home, "supernode", "list", CONNECTION, "--format", "json")
    try:
        return sum(n["status"] == "online" for n in json.loads(out.stdout)["nodes"])
    except (ValueError, KeyError):
        return 0


def prepare_config(overrides: list[str], sites: int) -> tuple[Path, Path]:
    """Compose, validate and save the config for `sites` sites; return (run folder, config file)."""
    cfg = C.absolute_paths(C.compose_config([*overrides, f"federation.num_sites={sites}"]), Path.cwd())
    C.validate(cfg)
    federation(C.data_spec(cfg), C.partition_spec(cfg))  # a bad partition fails here, before any process starts
    run_dir = Path(f"{C.run_dir_for(cfg)}_deploy")
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
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


def deploy(args: argparse.Namespace, work: Path, config_file: Path, procs: list[subprocess.Popen]) -> int:
    """Start the SuperLink and SuperNodes (appended to `procs`), run the app; return `flwr run`'s exit code."""
    port, cli_home = free_port(), work / "cli"
    certs = make_certs(work / "certs") if args.tls else None
    ca = certs[0] if certs else None
    write_connection(cli_home, port, ca)
    procs.append(start(superlink_command(port, certs, args.auth), work / "superlink", work / "superlink.log"))
    wait_until("flower-superlink", lambda: listening(port), procs, 60)
    print(f"SuperLink on 127.0.0.1:{port} ({'TLS' if args.tls else 'insecure'}"
          f"{', SuperNode auth' if args.auth else ''}); logs in {work}", flush=True)
    for i in range(args.sites):
        key = register(cli_home, work / "keys" / f"site-{i}", f"site-{i}") if args.auth else None
        procs.append(start(supernode_command(i, args.sites, port, ca, key), work / f"supernode-{i}",
                           work / f"supernode-{i}.log"))
    wait_until(f"{args.sites} SuperNodes online", lambda: online_nodes(cli_home) >= args.sites, procs, 120)
    run = ["flwr", "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", f"config-file='{config_file}'"]
    return subprocess.run(run, env=flwr_env() | {"FLWR_HOME": str(cli_home)}, timeout=args.timeout).returncode


def report(run_dir: Path) -> None:
    """Print the final metrics from summary.json and the last evaluation in metrics.jsonl."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    sites = {s: round(m["top1"], 3) for s, m in evals[-1].get("sites", {}).items()} if evals else {}
    print(f"final top-1 retrieval {summary['final_top1']:.3f}, top-5 {summary['final_top5']:.3f} "
          f"(chance {summary['chance_top1']:.3f}) after {summary['rounds']} rounds; top-1 per site {sites}")
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
    except ValueError as e:  # nothing started yet
        sys.exit(f"invalid config: {e}")
    work = Path(args.work_dir or run_dir / "deploy").resolve()
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops like Ctrl-C: through `finally`
    procs: list[subprocess.Popen] = []
    try:
        code = deploy(args, work, config_file, procs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"deployment failed: {e}", file=sys.stderr)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        print(f"stopping {len(procs)} Flower processes", file=sys.stderr, flush=True)
        stop(procs, work)
    if code != 0 or not (run_dir / "summary.json").is_file():
        print(f"deployment run failed (exit code {code}); logs in {work}", file=sys.stderr)
        return code or 1
    report(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
