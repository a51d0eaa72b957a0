#!/usr/bin/env python3
"""Cross-file checks that no single linter makes: the settings that must agree between the
Dockerfile, compose.yaml, haproxy.cfg, the Kubernetes manifests and the systemd unit.

Usage: python3 deploy/checks/consistency.py [rendered-compose.json]
  The optional argument is `docker compose config --format json` output; without it
  compose.yaml is read with PyYAML (anchors and merge keys resolved, no interpolation).
Needs PyYAML. Exit 0 = all agree, 1 = a mismatch, 77 = PyYAML missing.
"""

import json
import re
import sys
from pathlib import Path

try:
    import yaml
except ImportError:
    print("  consistency: SKIP: PyYAML missing (pip install pyyaml)")
    sys.exit(77)

DEPLOY = Path(__file__).resolve().parent.parent
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)


def seconds(text):
    """'10s', '1m', '500ms', '30' -> seconds (float)."""
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|min|sec)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse duration {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


# --- Dockerfile -----------------------------------------------------------------------
def check_dockerfile():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    check(re.search(r"^EXPOSE 7420$", dockerfile, re.MULTILINE), "Dockerfile: EXPOSE 7420 missing")
    check(re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE), "Dockerfile: USER 10001:10001 missing")
    check("TANDEM_LISTEN=0.0.0.0:7420" in dockerfile, "Dockerfile: TANDEM_LISTEN=0.0.0.0:7420 missing")
    check(
        re.search(r"^HEALTHCHECK ", dockerfile, re.MULTILINE) and "curl" in dockerfile,
        "Dockerfile: HEALTHCHECK (with curl installed) missing",
    )
    check(
        'ENTRYPOINT ["tandem"]' in dockerfile and 'CMD ["serve"]' in dockerfile, "Dockerfile: ENTRYPOINT/CMD"
    )
    check((DEPLOY / "Dockerfile.dockerignore").is_file(), "Dockerfile.dockerignore missing")


# --- compose.yaml + haproxy.cfg ---------------------------------------------------------
def check_compose_yaml_haproxy_cfg():
    if len(sys.argv) > 1:
        compose = json.loads(Path(sys.argv[1]).read_text())
    else:
        compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    nodes = sorted(n for n in services if re.fullmatch(r"tandem-\d+", n))
    check(len(nodes) == 3, f"compose: expected 3 tandem nodes, found {nodes}")
    for name in nodes:
        svc = services[name]
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        check(env.get("TANDEM_LISTEN") == "0.0.0.0:7420", f"compose {name}: TANDEM_LISTEN")
        check(
            any(
                env.get(k)
                for k in (
                    "TANDEM_JWT_SECRET",
                    "TANDEM_JWT_SECRET_FILE",
                    "TANDEM_JWT_RSA_PUBLIC_KEYS",
                    "TANDEM_JWT_EC_PUBLIC_KEYS",
                )
            ),
            f"compose {name}: no JWT key setting (0.0.0.0 requires one)",
        )
        check(
            str(env.get("TANDEM_STORE", "")).startswith("postgres://")
            and "@postgres:5432/" in env["TANDEM_STORE"],
            f"compose {name}: TANDEM_STORE must point at the postgres service",
        )
        check(
            str(env.get("TANDEM_REDIS", "")).startswith("redis://redis:6379"),
            f"compose {name}: TANDEM_REDIS must point at the redis service",
        )
        grace = seconds(env.get("TANDEM_SHUTDOWN_GRACE", "10s"))
        stop = seconds(svc.get("stop_grace_period", "10s"))
        check(stop > grace, f"compose {name}: stop_grace_period {stop}s must exceed shutdown grace {grace}s")
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        check("/ready" in test, f"compose {name}: healthcheck should probe /ready")
        deps = svc.get("depends_on", {})
        for dep in ("postgres", "redis"):
            check(
                isinstance(deps, dict) and deps.get(dep, {}).get("condition") == "service_healthy",
                f"compose {name}: depends_on {dep} with condition service_healthy",
            )
        build = svc.get("build", {})
        context = Path(build.get("context", ""))
        if not context.is_absolute():
            context = (DEPLOY / context).resolve()
        check(
            (context / build.get("dockerfile", "Dockerfile")).is_file(),
            f"compose {name}: build dockerfile not found from context {context}",
        )
        check(
            (context / "Cargo.lock").is_file(),
            f"compose {name}: build context {context} is not the repo root",
        )
    check(
        "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"]),
        "compose postgres: pg_isready healthcheck",
    )
    check(
        "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"]),
        "compose redis: redis-cli ping healthcheck",
    )

    lb = services.get("haproxy", {})
    mounts = [
        v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in lb.get("volumes", [])
    ]
    check(any("haproxy.cfg" in m for m in mounts), "compose haproxy: haproxy.cfg not mounted")
    check((DEPLOY / "haproxy" / "haproxy.cfg").is_file(), "haproxy/haproxy.cfg missing")
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", cfg, re.MULTILINE)
    check(
        sorted(s[1] for s in servers) == nodes and all(s[2] == "7420" for s in servers),
        f"haproxy.cfg servers {servers} must be the compose nodes {nodes} on port 7420",
    )
    check(re.search(r"^\s*balance leastconn", cfg, re.MULTILINE), "haproxy.cfg: balance leastconn")
    check(re.search(r"http-check send meth GET uri /ready", cfg), "haproxy.cfg: health check on /ready")
    tunnel = re.search(r"timeout tunnel (\S+)", cfg)
    check(tunnel and seconds(tunnel.group(1)) >= 600, "haproxy.cfg: timeout tunnel should be long (>= 10m)")

    env_example = (DEPLOY / ".env.example").read_text()
    m = re.search(r"^TANDEM_JWT_SECRET=(.*)$", env_example, re.MULTILINE)
    check(
        m and "REPLACE" in m.group(1) and len(m.group(1)) < 32,
        ".env.example: TANDEM_JWT_SECRET must be a placeholder shorter than 32 bytes (tandem refuses it)",
    )


# --- Kubernetes --------------------------------------------------------------------------
def check_kubernetes():
    docs = {}
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / res).read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    dep = docs[("Deployment", "tandem")]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    check(spec["replicas"] == 3, "k8s Deployment: 3 replicas")
    check(
        all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()),
        "k8s Deployment: selector does not match the pod labels",
    )
    for kind in ("Service", "PodDisruptionBudget"):
        obj = docs[(kind, "tandem")]
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        check(
            sel and all(labels.get(k) == v for k, v in sel.items()),
            f"k8s {kind}: selector does not match the pods",
        )
    pdb = docs[("PodDisruptionBudget", "tandem")]["spec"]
    check(
        pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 2,
        "k8s PDB: maxUnavailable 1 or minAvailable 2",
    )
    c = pod["containers"][0]
    check(c["readinessProbe"]["httpGet"]["path"] == "/ready", "k8s: readiness probe on /ready")
    check(c["livenessProbe"]["httpGet"]["path"] == "/health", "k8s: liveness probe on /health")
    check("startupProbe" in c, "k8s: startup probe")
    config = docs[("ConfigMap", c["envFrom"][0]["configMapRef"]["name"])]["data"]
    grace = seconds(config.get("TANDEM_SHUTDOWN_GRACE", "10s"))
    pre = c["lifecycle"]["preStop"]
    pre_sleep = seconds(pre["sleep"]["seconds"]) if "sleep" in pre else seconds(pre["exec"]["command"][-1])
    tgp = pod["terminationGracePeriodSeconds"]
    check(
        tgp > pre_sleep + grace,
        f"k8s: terminationGracePeriodSeconds {tgp} must exceed preStop {pre_sleep}s + grace {grace}s",
    )
    port = int(config["TANDEM_LISTEN"].rsplit(":", 1)[1])
    check(c["ports"][0]["containerPort"] == port, "k8s: containerPort must match TANDEM_LISTEN")
    check(config["TANDEM_LISTEN"].startswith("0.0.0.0:"), "k8s: TANDEM_LISTEN must be 0.0.0.0 in a pod")
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    check(sc.get("runAsNonRoot") and sc.get("runAsUser") == 10001, "k8s: non-root uid 10001 (the image's)")
    check(sc.get("readOnlyRootFilesystem") is True, "k8s: read-only root filesystem")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    secret_file = config.get("TANDEM_JWT_SECRET_FILE", "")
    check(
        secret_file.startswith(mounts.get("secrets", "?") + "/"),
        "k8s: TANDEM_JWT_SECRET_FILE must be in the secret mount",
    )
    check(mounts.get("data") == config.get("TANDEM_DATA_DIR"), "k8s: the data dir must be a mounted volume")
    secret = docs[("Secret", "tandem-secrets")]
    jwt = secret.get("stringData", {}).get("jwt-secret", "")
    check(
        "REPLACE" in jwt and len(jwt) < 32,
        "k8s Secret: jwt-secret must stay a placeholder shorter than 32 bytes (never commit a real secret)",
    )
    for ref in c.get("env", []):
        key = ref.get("valueFrom", {}).get("secretKeyRef")
        if key:
            check(
                key["key"] in secret.get("stringData", {}),
                f"k8s: secret key {key['key']} missing in the Secret",
            )


# --- systemd -----------------------------------------------------------------------------
def check_systemd():
    unit = (DEPLOY / "systemd" / "tandem.service").read_text()

    def unit_value(key):
        m = re.search(rf"^{key}=(.*)$", unit, re.MULTILINE)
        return m.group(1).strip() if m else None

    ugrace = seconds(unit_value("Environment=TANDEM_SHUTDOWN_GRACE") or "10s")
    check(
        seconds(unit_value("TimeoutStopSec") or "90s") > ugrace,
        "systemd: TimeoutStopSec must exceed TANDEM_SHUTDOWN_GRACE",
    )
    check(unit_value("KillSignal") == "SIGTERM", "systemd: KillSignal=SIGTERM")
    check(unit_value("EnvironmentFile") == "-/etc/tandem/tandem.env", "systemd: optional EnvironmentFile")
    check(unit_value("StateDirectory") == "tandem", "systemd: StateDirectory=tandem")


SECTIONS = (
    (check_dockerfile, "Dockerfile"),
    (check_compose_yaml_haproxy_cfg, "compose.yaml + haproxy.cfg"),
    (check_kubernetes, "Kubernetes"),
    (check_systemd, "systemd"),
)
for section, name in SECTIONS:
    try:
        section()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OSError, yaml.YAMLError) as e:
        failures.append(f"{name}: cannot read an expected setting: {type(e).__name__}: {e}")

if failures:
    for f in failures:
        print(f"  consistency: FAIL: {f}")
    sys.exit(1)
print("  consistency: PASS (Dockerfile, compose.yaml, haproxy.cfg, k8s, systemd agree)")
