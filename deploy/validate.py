"""Checks the deployment files without a cluster or Docker, offline:

- every Kubernetes manifest in kubernetes/ against the Kubernetes OpenAPI schemas, strictly (no
  unknown fields), for the oldest and newest versions we claim (kubernetes-validate ships them);
- docker-compose.yml against the compose-spec JSON schema (check-jsonschema ships it);
- what no schema can see: Services select the pods they front and name ports those pods have,
  the StatefulSet's governing Service is headless, workers point at the coordinator's Service
  and port and ask for a GPU, claims exist; in compose, bind-mounted files exist, Prometheus and
  Grafana find their configuration where they look for it, and workers reach the coordinator;
  in both, every token file is a mounted Secret (never part of the image), workers send the
  token the coordinator checks for workers, and a worker cannot read the clients' token.

Usage: python deploy/validate.py [--root REPO]      (exit 1 listing every problem)
Needs: pip install kubernetes-validate check-jsonschema pyyaml (scripts/requirements.txt).
"""
import argparse
import os
import re
import subprocess
import sys

import yaml
import kubernetes_validate

K8S_VERSIONS = ["1.29.0", "1.37.0"]

problems = []
checked = 0


def check(ok, message):
    global checked
    checked += 1
    if not ok:
        problems.append(message)


def kubernetes(root):
    folder = os.path.join(root, "deploy", "kubernetes")
    docs = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(folder, name)
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs.append((name, doc))
    check(docs, f"{folder}: no manifests")
    for name, doc in docs:
        what = f"kubernetes/{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                check(True, "")
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                check(False, f"{what}: not a valid Kubernetes {version} object at {path or '(top)'}: {e.message}")
            except Exception as e:  # an unknown kind or version, a malformed document
                check(False, f"{what}: cannot be validated against Kubernetes {version}: {e}")
        check(doc.get("kind") == "Namespace" or doc.get("metadata", {}).get("namespace") == "mezo",
              f"{what}: not in namespace mezo")

    by_kind = {}
    for name, doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append(doc)
    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])

    def pod_labels(w):
        return w["spec"]["template"]["metadata"].get("labels", {})

    def containers(w):
        return w["spec"]["template"]["spec"]["containers"]

    for w in workloads:
        wn = f"{w['kind']}/{w['metadata']['name']}"
        sel = w["spec"]["selector"].get("matchLabels", {})
        check(all(pod_labels(w).get(k) == v for k, v in sel.items()), f"{wn}: selector {sel} does not match its pod labels")
        for v in w["spec"]["template"]["spec"].get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                check(any(p["metadata"]["name"] == claim for p in by_kind.get("PersistentVolumeClaim", [])),
                      f"{wn}: volume {v['name']} claims {claim}, which no manifest defines")
        for c in containers(w):
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            known = {v["name"] for v in w["spec"]["template"]["spec"].get("volumes", [])}
            known |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            check(mounts <= known, f"{wn}: container {c['name']} mounts {sorted(mounts - known)}, which are not volumes")

    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for sname, s in services.items():
        sel = s["spec"].get("selector", {})
        fronted = [w for w in workloads if sel and all(pod_labels(w).get(k) == v for k, v in sel.items())]
        check(fronted, f"Service/{sname}: selector {sel} matches no workload's pods")
        for w in fronted:
            names = {p.get("name") for c in containers(w) for p in c.get("ports", [])}
            numbers = {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                t = p.get("targetPort", p["port"])
                check(t in names or t in numbers, f"Service/{sname}: targetPort {t!r} is no port of {w['metadata']['name']}'s pods")

    for ss in by_kind.get("StatefulSet", []):
        gov = services.get(ss["spec"]["serviceName"])
        check(gov is not None and gov["spec"].get("clusterIP") == "None",
              f"StatefulSet/{ss['metadata']['name']}: serviceName {ss['spec']['serviceName']} must be a headless Service")
        check(ss["spec"].get("volumeClaimTemplates"), f"StatefulSet/{ss['metadata']['name']}: no volume for the store")

    workers = [w for w in workloads if any("worker" in c.get("args", []) for c in containers(w))]
    check(workers, "no worker Deployment (a container with args `worker`)")
    for w in workers:
        for c in containers(w):
            args = " ".join(c.get("args", []))
            m = re.search(r"--coordinator[= ]http://([^:/ ]+):(\d+)", args)
            check(m, f"{w['metadata']['name']}: worker has no --coordinator=http://HOST:PORT")
            if m:
                svc = services.get(m.group(1))
                check(svc and any(p["port"] == int(m.group(2)) for p in svc["spec"]["ports"]),
                      f"{w['metadata']['name']}: --coordinator {m.group(0)} is no Service port")
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            check(gpus is not None and int(gpus) >= 1, f"{w['metadata']['name']}: worker requests no nvidia.com/gpu")

    # Tokens: every token file is in a mounted Secret, workers send the token the coordinator
    # checks for workers, and no worker can read the clients' token.
    def secret_file(w, c, path):
        """(secretName, key) of the Secret file at `path` in container c, or None."""
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            sec = vols.get(m["name"], {}).get("secret")
            root = m["mountPath"].rstrip("/") + "/"
            if sec and path.startswith(root):
                rel = path[len(root):]
                items = sec.get("items")
                if items is None:
                    return sec["secretName"], rel
                key = next((i["key"] for i in items if i["path"] == rel), None)
                return (sec["secretName"], key) if key else None
        return None

    def token_flags(c):
        return dict(m.groups() for a in c.get("args", []) if (m := re.match(r"--((?:client-|worker-)?token-file)=(.+)", a)))

    coordinator_tokens = {}
    for w in workloads:
        wn = f"{w['kind']}/{w['metadata']['name']}"
        for c in containers(w):
            for flag, path in token_flags(c).items():
                f = secret_file(w, c, path)
                check(f, f"{wn}: --{flag}={path} is not a file of a mounted Secret (tokens must not be in the image or the manifest)")
                if f and flag != "token-file":
                    coordinator_tokens[flag] = f
    for w in workers:
        wn = f"{w['kind']}/{w['metadata']['name']}"
        for c in containers(w):
            path = token_flags(c).get("token-file")
            expected = coordinator_tokens.get("worker-token-file")
            check((path is None) == (expected is None), f"{wn}: the coordinator checks worker tokens but the worker sends none (--token-file)" if expected else f"{wn}: the worker sends a token the coordinator does not check")
            if path and expected:
                check(secret_file(w, c, path) == expected, f"{wn}: --token-file={path} is not the Secret key {'/'.join(expected)} the coordinator's --worker-token-file reads")
            client = coordinator_tokens.get("client-token-file")
            vols = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
            for m in c.get("volumeMounts", []):
                sec = vols.get(m["name"], {}).get("secret")
                if client and sec and sec["secretName"] == client[0]:
                    keys = None if sec.get("items") is None else [i["key"] for i in sec["items"]]
                    check(keys is not None and client[1] not in keys,
                          f"{wn}: the worker's pod can read the clients' token (Secret {client[0]} key {client[1]}): mount only the worker's key (items)")
    return len(docs)


def interpolate(s):
    """Compose's ${VAR:-default} with the variables unset: the defaults the file ships with."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", s)


def compose(root):
    deploy = os.path.join(root, "deploy")
    path = os.path.join(deploy, "docker-compose.yml")
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", path],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"docker-compose.yml does not follow the compose spec:\n{r.stdout}{r.stderr}")
    with open(path) as f:
        c = yaml.safe_load(f)
    services = c.get("services", {})
    for want in ["coordinator", "worker", "prometheus", "grafana"]:
        check(want in services, f"docker-compose.yml: no {want} service")

    def mounts(svc):
        out = {}
        for v in services.get(svc, {}).get("volumes", []):
            parts = interpolate(v).split(":") if isinstance(v, str) else [v["source"], v["target"]]
            out[parts[1]] = parts[0]
        return out

    for name, svc in services.items():
        for target, source in mounts(name).items():
            if source.startswith((".", "/")):
                check(os.path.exists(os.path.join(deploy, source)), f"docker-compose.yml: {name} mounts {source}, which does not exist")
    # Prometheus reads the config it is told to, with the rules file beside it.
    prom = services.get("prometheus", {})
    cfg = next((a.split("=", 1)[1] for a in prom.get("command", []) if a.startswith("--config.file=")), None)
    check(cfg in mounts("prometheus"), f"docker-compose.yml: prometheus --config.file {cfg} is not mounted")
    check(mounts("prometheus").get(cfg, "").endswith("prometheus/prometheus.yml"), "prometheus mounts the wrong config")
    with open(os.path.join(deploy, "prometheus", "prometheus.yml")) as f:
        pcfg = yaml.safe_load(f)
    cdir = os.path.dirname(cfg or "")
    for rf in pcfg.get("rule_files", []):
        check(os.path.join(cdir, rf) in mounts("prometheus"), f"prometheus.yml's rule file {rf} is not mounted beside it")
    targets = [t for j in pcfg["scrape_configs"] for s in j.get("static_configs", []) for t in s["targets"]]
    coord_cmd = " ".join(services.get("coordinator", {}).get("command", []))
    m = re.search(r"--metrics-listen=[^: ]*:(\d+)", coord_cmd)
    check(m and f"coordinator:{m.group(1)}" in targets, f"prometheus.yml scrapes {targets}, not the coordinator's --metrics-listen")
    # Grafana finds the provisioning files and the dashboards where the provider says.
    g = mounts("grafana")
    check(g.get("/etc/grafana/provisioning") == "../dashboards/provisioning", "grafana: provisioning not mounted from ../dashboards/provisioning")
    with open(os.path.join(root, "dashboards", "provisioning", "dashboards", "mezo.yaml")) as f:
        provider = yaml.safe_load(f)["providers"][0]["options"]["path"]
    check(g.get(provider) == "../dashboards", f"grafana: the dashboard provider reads {provider}, where ../dashboards is not mounted")
    home = services.get("grafana", {}).get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    check(os.path.exists(os.path.join(root, "dashboards", os.path.relpath(home, provider))) if home.startswith(provider) else False,
          f"grafana: home dashboard {home} is not one of dashboards/")
    env = services.get("grafana", {}).get("environment", {})
    with open(os.path.join(root, "dashboards", "provisioning", "datasources", "prometheus.yaml")) as f:
        ds = yaml.safe_load(f)["datasources"][0]
    check(ds["url"] == "${PROMETHEUS_URL}" and env.get("PROMETHEUS_URL", "").startswith("http://prometheus:"),
          "grafana: the datasource URL does not reach the prometheus service")
    # Workers reach the coordinator's gRPC port and reserve a GPU.
    w = services.get("worker", {})
    wcmd = " ".join(w.get("command", []))
    lm = re.search(r"--listen=[^: ]*:(\d+)", coord_cmd)
    check(lm and f"--coordinator=http://coordinator:{lm.group(1)}" in wcmd, f"worker: `{wcmd}` does not reach the coordinator's --listen")
    devices = w.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    check(any("gpu" in d.get("capabilities", []) for d in devices), "worker: no GPU device reservation")
    # Tokens: compose secrets (files under /run/secrets), workers send the coordinator's worker
    # token, and no worker has the clients' token.
    def secrets_of(svc):
        out = {}
        for x in services.get(svc, {}).get("secrets", []):
            name = x if isinstance(x, str) else x["source"]
            target = name if isinstance(x, str) else x.get("target", name)
            out[f"/run/secrets/{target}"] = name
        return out

    defined = c.get("secrets", {})
    tokens = {}
    for name in ["coordinator", "worker"]:
        for a in services.get(name, {}).get("command", []):
            m = re.match(r"--((?:client-|worker-)?token-file)=(.+)", a)
            if not m:
                continue
            secret = secrets_of(name).get(m.group(2))
            check(secret in defined, f"docker-compose.yml: {name} {a} is not a secret the service has")
            if secret in defined:
                src = defined[secret].get("file", "")
                check(src.startswith("./secrets/") and os.path.exists(os.path.join(deploy, "secrets", ".gitignore")),
                      f"docker-compose.yml: secret {secret} is read from {src}, outside the git-ignored deploy/secrets/")
            tokens[(name, m.group(1))] = secret
    expected = tokens.get(("coordinator", "worker-token-file"))
    sent = tokens.get(("worker", "token-file"))
    check(sent == expected, f"docker-compose.yml: the worker sends the token of secret {sent}, the coordinator checks workers against {expected}")
    client_secret = tokens.get(("coordinator", "client-token-file"))
    check(client_secret is None or client_secret not in secrets_of("worker").values(),
          f"docker-compose.yml: the worker has the clients' token (secret {client_secret})")
    return len(services)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    a = ap.parse_args()
    n_k8s = kubernetes(a.root)
    n_compose = compose(a.root)
    if problems:
        print(f"deploy: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        sys.exit(1)
    print(f"deploy: {checked} checks passed ({n_k8s} Kubernetes objects against {', '.join(K8S_VERSIONS)}; "
          f"{n_compose} compose services)")


if __name__ == "__main__":
    main()
