#!/usr/bin/env python3
"""Structural checks of the deployment artifacts, called by scripts/check-deploy.sh (one subcommand each).

  split RENDERED OUTDIR            one file per object; KEDA objects (JSON) apart from core ones (YAML)
  crd-schemas CRD_DIR OUTDIR       KEDA CRDs' openAPIV3Schema -> strict JSON schemas (unknown fields rejected)
  policy VARIANT RENDERED          pod hardening, workload identity wiring, the variant's expected shape
  extract RENDERED WHAT OUT        scrape config / KEDA PromQL queries for promtool
  env BINARY COMPOSE RENDERED...   env names set vs the names `BINARY --help` accepts ([env: NAME=])
  compose COMPOSE CONFIG_JSON      emulator + SQL Edge wiring, connection strings, the 10-connection cap
  sequence NAME DRY_RUN_OUTPUT     tutorial.sh --dry-run commands vs the tutorial's steps, in order
  dockerfile PATH                  multi-stage, distroless cc nonroot, binary only, ports

Prints one line per problem and exits 1 when there is any.
"""
import json
import os
import re
import subprocess
import sys

import yaml

PLACEHOLDERS = ["IMAGE", "SB_NAME", "SB_HOSTNAME", "SB_QUEUE_NAME", "MI_CLIENT_ID", "PRODUCER_CLIENT_ID",
                "CONSUMER_CLIENT_ID", "SCALER_CLIENT_ID", "KEDA_CLIENT_ID", "PROMETHEUS_QUERY_ENDPOINT"]
WEBHOOK_ENV = {"AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST"}
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
problems = []


def problem(msg):
    problems.append(msg)


def finish():
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ident(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --- split: one file per object; KEDA objects apart from core ones ------------------------------------------
def cmd_split(rendered, outdir):
    docs = load(rendered)
    os.makedirs(f"{outdir}/core", exist_ok=True)
    os.makedirs(f"{outdir}/keda", exist_ok=True)
    for i, d in enumerate(docs):
        group = "keda" if d.get("apiVersion", "").startswith("keda.sh/") else "core"
        name = f"{i:02d}-{d['kind']}-{d['metadata']['name']}"
        ext = "json" if group == "keda" else "yaml"
        with open(f"{outdir}/{group}/{name}.{ext}", "w") as f:
            if group == "keda":
                json.dump(d, f, indent=1)
            else:
                yaml.safe_dump(d, f)
    print(len(docs))


# --- crd-schemas: KEDA CRD openAPIV3Schema -> strict JSON schema ---------------------------------------------
def strictify(node):
    """The API server rejects unknown fields (kubectl's default --validate=strict): mirror that."""
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for sub in value.values():
                    strictify(sub)
            elif key in ("items", "additionalProperties", "not"):
                strictify(value)
            elif key in ("allOf", "anyOf", "oneOf"):
                for sub in value:
                    strictify(sub)


def cmd_crd_schemas(crd_dir, outdir):
    kinds = []
    for fn in sorted(os.listdir(crd_dir)):
        if not fn.endswith((".yaml", ".yml")):
            continue
        for crd in load(os.path.join(crd_dir, fn)):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                schema = version["schema"]["openAPIV3Schema"]
                strictify(schema)
                schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                schema["properties"]["kind"] = {"const": kind}
                schema.setdefault("required", [])
                for field in ("apiVersion", "kind", "metadata"):
                    if field not in schema["required"]:
                        schema["required"].append(field)
                schema["$schema"] = "http://json-schema.org/draft-07/schema#"
                with open(f"{outdir}/{kind}.json", "w") as f:
                    json.dump(schema, f)
                kinds.append(kind)
    print(" ".join(kinds))


# --- policy: every pod hardened, identities wired, variant structure as the tutorial describes ---------------
def pod_templates(obj):
    kind = obj["kind"]
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return [obj["spec"]["template"]]
    if kind == "ScaledJob":
        return [obj["spec"]["jobTargetRef"]["template"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]]
    if kind == "Pod":
        return [obj]
    return []


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_pod(where, tmpl, service_accounts):
    spec = tmpl.get("spec", {})
    labels = tmpl.get("metadata", {}).get("labels", {})
    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problem(f"{where}: pod securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser") == 0:
        problem(f"{where}: runAsUser 0 (root)")
    if "terminationGracePeriodSeconds" not in spec:
        problem(f"{where}: terminationGracePeriodSeconds not set")
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{where}: automountServiceAccountToken should be false (workload identity projects its own token)")
    sa = spec.get("serviceAccountName")
    if labels.get("azure.workload.identity/use") != "true":
        problem(f"{where}: pod label azure.workload.identity/use: \"true\" missing")
    if sa not in service_accounts:
        problem(f"{where}: serviceAccountName {sa!r} is not a ServiceAccount of this build")
    else:
        client_id = service_accounts[sa].get("metadata", {}).get("annotations", {}).get(
            "azure.workload.identity/client-id", "")
        if not UUID.match(client_id):
            problem(f"{where}: ServiceAccount {sa} has no azure.workload.identity/client-id UUID ({client_id!r})")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp != "RuntimeDefault":
            problem(f"{cw}: seccompProfile must be RuntimeDefault (got {seccomp!r})")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{cw}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{cw}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problem(f"{cw}: capabilities must drop ALL")
        if sc.get("capabilities", {}).get("add"):
            problem(f"{cw}: adds capabilities {sc['capabilities']['add']}")
        if sc.get("privileged"):
            problem(f"{cw}: privileged")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    problem(f"{cw}: resources.{part}.{r} not set")
        image = c.get("image", "")
        if not image or image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
            problem(f"{cw}: image {image!r} should carry an explicit tag")
        for name in env_of(c):
            if name in WEBHOOK_ENV:
                problem(f"{cw}: sets {name}, which the workload identity webhook injects")


def first_container(obj):
    return pod_templates(obj)[0]["spec"]["containers"][0]


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def check_trigger_target(where, trigger, queue, sb_name):
    md = trigger.get("metadata", {})
    if md.get("queueName") != queue:
        problem(f"{where}: trigger queueName {md.get('queueName')!r} != the consumer's queue {queue!r}")
    if md.get("namespace") != sb_name:
        problem(f"{where}: trigger namespace {md.get('namespace')!r} != Service Bus namespace {sb_name!r}")
    if md.get("messageCount") != "10":
        problem(f"{where}: trigger messageCount should be \"10\" (one Job per 10 messages)")


def expect_env(where, container, **expected):
    env = env_of(container)
    for k, v in expected.items():
        if env.get(k) != v:
            problem(f"{where}: {k}={env.get(k)!r}, expected {v!r}")


def check_auth(where, trigger, auths, service_account_client_id=None):
    ref = trigger.get("authenticationRef", {}).get("name")
    if ref not in auths:
        problem(f"{where}: authenticationRef {ref!r} names no TriggerAuthentication of this build")
        return
    pi = auths[ref]["spec"].get("podIdentity", {})
    if pi.get("provider") != "azure-workload":
        problem(f"{where}: TriggerAuthentication {ref} provider {pi.get('provider')!r}, expected azure-workload")
    if not UUID.match(pi.get("identityId", "")):
        problem(f"{where}: TriggerAuthentication {ref} identityId is not a client id")
    if service_account_client_id and pi.get("identityId") != service_account_client_id:
        problem(f"{where}: TriggerAuthentication {ref} identityId differs from the workload identity's client id")


def service_ports(docs):
    out = {}
    for svc in by_kind(docs, "Service").values():
        ns = svc["metadata"].get("namespace", "default")
        for p in svc["spec"].get("ports", []):
            out[(svc["metadata"]["name"], ns, p["port"])] = svc
    return out


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def scalars(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from scalars(v)
    elif isinstance(node, list):
        for v in node:
            yield from scalars(v)
    elif isinstance(node, str):
        yield node


def check_scaler_tls(trigger, auths, scaler):
    """KEDA connects with TLS and a client certificate; the scaler serves TLS and demands client certificates."""
    if trigger["metadata"].get("enableTLS") != "true":
        problem("external-scaler-tls: trigger metadata enableTLS must be \"true\"")
    ref = trigger.get("authenticationRef", {}).get("name")
    params = {r.get("parameter") for r in auths.get(ref, {}).get("spec", {}).get("secretTargetRef", [])}
    if not {"caCert", "tlsClientCert", "tlsClientKey"} <= params:
        problem(f"external-scaler-tls: TriggerAuthentication {ref!r} must give KEDA caCert, tlsClientCert and "
                f"tlsClientKey (has {sorted(params)})")
    pod = scaler["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    for name in ("SCALER_TLS_CERT_FILE", "SCALER_TLS_KEY_FILE", "SCALER_TLS_CLIENT_CA_FILE"):
        if not env.get(name):
            problem(f"external-scaler-tls: the scaler needs {name}")
    if "grpc" in c.get("livenessProbe", {}):
        problem("external-scaler-tls: the kubelet's gRPC probe cannot speak TLS; probe /healthz")
    secret_volumes = [v for v in pod.get("volumes", []) if "secret" in v]
    if secret_volumes and "fsGroup" not in pod.get("securityContext", {}):
        problem("external-scaler-tls: without fsGroup the non-root scaler cannot read its Secret files")


def cmd_policy(variant, rendered):
    docs = load(rendered)
    sas = by_kind(docs, "ServiceAccount")
    for obj in docs:
        for tmpl in pod_templates(obj):
            check_pod(ident(obj), tmpl, sas)
        if obj.get("metadata", {}).get("namespace") is None:
            problem(f"{ident(obj)}: no metadata.namespace")
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "servicebusdemo-settings":
            problem("the local-config settings ConfigMap leaked into the output")
    for value in scalars(docs):
        for token in PLACEHOLDERS:
            if value == token or f'"{token}"' in value or value.endswith(f"={token}"):
                problem(f"placeholder {token} left unreplaced ({value!r})")
    jobs, sjs, deps = by_kind(docs, "Job"), by_kind(docs, "ScaledJob"), by_kind(docs, "Deployment")
    auths, sos = by_kind(docs, "TriggerAuthentication"), by_kind(docs, "ScaledObject")
    producer = jobs.get("myproducer")
    if not producer:
        problem("no producer Job myproducer")
        return
    pc = first_container(producer)
    expect_env("Job/myproducer", pc, OPERATION_MODE="producer", MESSAGE_COUNT="100")
    queue = env_of(pc).get("AZURE_SERVICEBUS_QUEUE_NAME")
    host = env_of(pc).get("AZURE_SERVICEBUS_HOSTNAME") or ""
    sb_name = host.split(".", 1)[0]
    if not host.endswith(".servicebus.windows.net"):
        problem(f"Job/myproducer: AZURE_SERVICEBUS_HOSTNAME {host!r} is not <namespace>.servicebus.windows.net")
    for obj in list(jobs.values()) + list(sjs.values()) + list(deps.values()):
        c = first_container(obj)
        if env_of(c).get("AZURE_SERVICEBUS_QUEUE_NAME") != queue:
            problem(f"{ident(obj)}: queue differs from the producer's ({queue!r})")
        if env_of(c).get("AZURE_SERVICEBUS_HOSTNAME") != host:
            problem(f"{ident(obj)}: host name differs from the producer's ({host!r})")
    images = {c["image"] for o in docs for t in pod_templates(o) for c in t["spec"]["containers"]}
    if len(images) != 1:
        problem(f"every container should run the one servicebusdemo image, found {sorted(images)}")

    if variant == "base":
        if set(sas) != {"servicebusdemo"}:
            problem(f"base: ServiceAccounts {sorted(sas)}, expected the tutorial's one (servicebusdemo)")
        sj = sjs.get("myconsumer-scaledjob")
        if not sj:
            problem("base: no ScaledJob myconsumer-scaledjob")
            return
        expect_env("ScaledJob", first_container(sj), OPERATION_MODE="consumer", MESSAGE_COUNT="10")
        trig = sj["spec"]["triggers"]
        if len(trig) != 1 or trig[0].get("type") != "azure-servicebus":
            problem("base: the ScaledJob needs exactly one azure-servicebus trigger")
            return
        check_trigger_target("base ScaledJob", trig[0], queue, sb_name)
        client_id = sas.get("servicebusdemo", {}).get("metadata", {}).get("annotations", {}).get(
            "azure.workload.identity/client-id")
        check_auth("base ScaledJob", trig[0], auths, client_id)
    else:
        expected_sas = {"servicebusdemo-producer", "servicebusdemo-consumer", "servicebusdemo-scaler"}
        if set(sas) != expected_sas:
            problem(f"{variant}: ServiceAccounts {sorted(sas)}, expected {sorted(expected_sas)}")
        client_ids = [s["metadata"]["annotations"].get("azure.workload.identity/client-id") for s in sas.values()]
        if len(set(client_ids)) != len(client_ids):
            problem(f"{variant}: roles share a client id; each needs its own least-privilege identity")
        if producer["spec"]["template"]["spec"].get("serviceAccountName") != "servicebusdemo-producer":
            problem(f"{variant}: the producer must run as servicebusdemo-producer (Data Sender)")
        scaler = deps.get("servicebusdemo-scaler")
        if not scaler:
            problem(f"{variant}: no Deployment servicebusdemo-scaler")
            return
        sc = first_container(scaler)
        expect_env("Deployment/servicebusdemo-scaler", sc, OPERATION_MODE="scaler")
        if scaler["spec"]["template"]["spec"].get("serviceAccountName") != "servicebusdemo-scaler":
            problem(f"{variant}: the scaler must run as servicebusdemo-scaler")
        ports = {p["containerPort"]: p.get("name") for p in sc.get("ports", [])}
        if ports.get(6000) != "grpc" or ports.get(8080) != "metrics":
            problem(f"{variant}: scaler ports should be grpc 6000 and metrics 8080, got {ports}")
        scaler_labels = scaler["spec"]["template"]["metadata"]["labels"]
        policies = [p for p in by_kind(docs, "NetworkPolicy").values()
                    if selects(p["spec"]["podSelector"].get("matchLabels"), scaler_labels)]
        if not policies:
            problem(f"{variant}: no NetworkPolicy selects the scaler pods")
        for pol in policies:
            if "Ingress" not in pol["spec"].get("policyTypes", []):
                problem(f"{variant}: NetworkPolicy {pol['metadata']['name']} does not restrict ingress")
            for rule in pol["spec"].get("ingress", []):
                if not rule.get("from"):
                    problem(f"{variant}: NetworkPolicy {pol['metadata']['name']} has a rule open to every peer")
        if variant in ("overlays/external-scaler", "overlays/external-scaler-tls"):
            tls = variant.endswith("-tls")
            azure = [n for n, a in auths.items() if "podIdentity" in a["spec"]]
            if azure or (auths and not tls):
                problem("external-scaler: KEDA holds no Azure identity here, found TriggerAuthentication "
                        + ", ".join(azure or auths))
            sj = sjs.get("myconsumer-scaledjob")
            if not sj:
                problem("external-scaler: no ScaledJob myconsumer-scaledjob")
                return
            if sj["spec"]["jobTargetRef"]["template"]["spec"].get("serviceAccountName") != "servicebusdemo-consumer":
                problem("external-scaler: consumers must run as servicebusdemo-consumer (Data Receiver)")
            expect_env("ScaledJob", first_container(sj), OPERATION_MODE="consumer", MESSAGE_COUNT="10")
            trig = sj["spec"]["triggers"]
            if len(trig) != 1 or trig[0].get("type") != "external":
                problem("external-scaler: the ScaledJob needs exactly one external trigger")
                return
            if tls:
                check_scaler_tls(trig[0], auths, scaler)
            elif "authenticationRef" in trig[0]:
                problem("external-scaler: the external trigger must not reference a TriggerAuthentication")
            check_trigger_target("external trigger", trig[0], queue, sb_name)
            addr = trig[0]["metadata"].get("scalerAddress", "")
            m = re.match(r"^([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)$", addr)
            svc = m and service_ports(docs).get((m.group(1), m.group(2), int(m.group(3))))
            if not svc:
                problem(f"external-scaler: scalerAddress {addr!r} is not a Service port of this build")
            elif not selects(svc["spec"]["selector"], scaler_labels):
                problem(f"external-scaler: Service {m.group(1)} does not select the scaler pods")
            grpc_rules = [r for p in policies for r in p["spec"].get("ingress", [])
                          if any(pt.get("port") in (6000, "grpc") for pt in r.get("ports", []))]
            keda_only = all(
                f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "keda-operator"
                and f.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                == "kube-system" for r in grpc_rules for f in r["from"])
            if not grpc_rules or not keda_only:
                problem("external-scaler: the gRPC port must be reachable from kube-system/keda-operator only")
        else:  # prometheus
            if sjs:
                problem("prometheus: the worker Deployment replaces the ScaledJob, found " + ", ".join(sjs))
            worker = deps.get("myconsumer")
            if not worker:
                problem("prometheus: no consumer Deployment myconsumer")
                return
            expect_env("Deployment/myconsumer", first_container(worker), OPERATION_MODE="consumer", MESSAGE_COUNT="0")
            if "replicas" in worker["spec"]:
                problem("prometheus: the worker Deployment sets replicas; KEDA owns them")
            if worker["spec"]["template"]["spec"].get("serviceAccountName") != "servicebusdemo-consumer":
                problem("prometheus: the worker must run as servicebusdemo-consumer")
            so = sos.get("myconsumer-scaledobject")
            if not so:
                problem("prometheus: no ScaledObject myconsumer-scaledobject")
                return
            if so["spec"]["scaleTargetRef"].get("name") != "myconsumer":
                problem("prometheus: the ScaledObject must target Deployment myconsumer")
            trig = so["spec"]["triggers"]
            if len(trig) != 1 or trig[0].get("type") != "prometheus":
                problem("prometheus: the ScaledObject needs exactly one prometheus trigger")
                return
            md = trig[0]["metadata"]
            want = f'servicebusdemo_queue_active_messages{{queue="{queue}"}}'
            if want not in md.get("query", ""):
                problem(f"prometheus: query {md.get('query')!r} does not read {want}")
            if not md.get("serverAddress", "").startswith("https://"):
                problem("prometheus: serverAddress must be the workspace's https query endpoint")
            if md.get("threshold") != "10":
                problem("prometheus: threshold should be \"10\" (one replica per 10 messages)")
            check_auth("prometheus ScaledObject", trig[0], auths)
            cms = by_kind(docs, "ConfigMap")
            if "prometheus-config" not in cms.get("ama-metrics-prometheus-config", {}).get("data", {}):
                problem("prometheus: no ama-metrics-prometheus-config scrape configuration")
            scrape_ok = any(any(pt.get("port") in (8080, "metrics") for pt in r.get("ports", []))
                            for p in policies for r in p["spec"].get("ingress", []))
            if not scrape_ok:
                problem("prometheus: the NetworkPolicy must let Prometheus scrape port 8080")
    finish()


def cmd_extract(rendered, what, out):
    docs = load(rendered)
    if what == "scrape-config":
        data = by_kind(docs, "ConfigMap")["ama-metrics-prometheus-config"]["data"]["prometheus-config"]
        with open(out, "w") as f:
            f.write(data)
    elif what == "scrape-config-static":
        config = yaml.safe_load(by_kind(docs, "ConfigMap")["ama-metrics-prometheus-config"]["data"]["prometheus-config"])
        for job in config.get("scrape_configs", []):
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["scaler.invalid:8080"]}]
        with open(out, "w") as f:
            yaml.safe_dump(config, f)
    elif what == "query-rules":
        rules = [{"record": f"servicebusdemo:keda_query:{i}", "expr": so_trigger["metadata"]["query"]}
                 for i, so_trigger in enumerate(t for so in by_kind(docs, "ScaledObject").values()
                                                for t in so["spec"]["triggers"] if t["type"] == "prometheus")]
        with open(out, "w") as f:
            yaml.safe_dump({"groups": [{"name": "keda-queries", "rules": rules}]}, f)
        print(len(rules))


# --- env: the names the binary accepts (clap prints [env: NAME=]) vs the names the manifests set -----------
def help_text(binary, args):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run([binary, *args, "--help"], capture_output=True, text=True, env=env, timeout=30)
    return r.stdout + r.stderr, r.returncode


def option_blocks(text):
    """Splits clap's options section into blocks: (long flag, text of the block)."""
    blocks, current = [], None
    for line in text.splitlines():
        m = re.match(r"^\s{1,8}(?:-\w,?\s+)?--([A-Za-z0-9][\w-]*)", line)
        if m:
            current = [m.group(1), line]
            blocks.append(current)
        elif current is not None and line.strip() and line.startswith(" "):
            current[1] += "\n" + line
        elif not line.strip():
            continue
        else:
            current = None
    return blocks


def parse_help(text):
    flags_env, modes = {}, set()
    for flag, block in option_blocks(text):
        m = re.search(r"\[env:\s*([A-Z][A-Z0-9_]*)(?:=|\])", block)
        if m:
            flags_env[flag] = m.group(1)
            if m.group(1) == "OPERATION_MODE":
                pv = re.search(r"\[possible values: ([^\]]+)\]", block)
                if pv:
                    modes |= {v.strip() for v in pv.group(1).split(",")}
                modes |= set(re.findall(r"^\s+- ([a-z][\w-]*)", block, re.M))
    usage = re.search(r"Usage:(.*?)(?:\n\s*\n|\Z)", text, re.S)
    usage = re.sub(r"\[[^\]]*\]", "", usage.group(1)) if usage else ""
    required = set(re.findall(r"--([A-Za-z0-9][\w-]*)", usage))
    commands = []
    section = re.search(r"^Commands:\n(.*?)(?:\n\s*\n|\Z)", text, re.S | re.M)
    if section:
        commands = [c for c in re.findall(r"^\s{2}([a-z][\w-]*)\s", section.group(1), re.M) if c != "help"]
    return flags_env, modes, required, commands


def accepted_env(binary):
    root, status = help_text(binary, [])
    if status != 0:
        raise SystemExit(f"{binary} --help exited {status}:\n{root}")
    flags_env, modes, required, commands = parse_help(root)
    names = set(flags_env.values())
    required_env = {"": {flags_env.get(f, f"--{f}") for f in required}}
    for cmd in commands:
        text, status = help_text(binary, [cmd])
        if status != 0:
            raise SystemExit(f"{binary} {cmd} --help exited {status}:\n{text}")
        fe, _, req, _ = parse_help(text)
        names |= set(fe.values())
        merged = {**flags_env, **fe}
        required_env[cmd] = {merged.get(f, f"--{f}") for f in req}
    modes |= set(commands)
    return names, modes, required_env


def manifest_containers(rendered_files):
    """(where, container, workload identity client id or None) for every container of the rendered files."""
    for path in rendered_files:
        docs = load(path)
        sas = by_kind(docs, "ServiceAccount")
        for obj in docs:
            for tmpl in pod_templates(obj):
                client_id = None
                if tmpl.get("metadata", {}).get("labels", {}).get("azure.workload.identity/use") == "true":
                    sa = sas.get(tmpl["spec"].get("serviceAccountName"), {})
                    client_id = sa.get("metadata", {}).get("annotations", {}).get("azure.workload.identity/client-id")
                for c in tmpl["spec"]["containers"]:
                    yield f"{os.path.basename(path).rsplit('.', 1)[0]}:{ident(obj)}/{c['name']}", c, client_id


def compose_containers(compose_config):
    with open(compose_config) as f:
        doc = yaml.safe_load(f)
    for name, svc in doc.get("services", {}).items():
        if svc.get("image", "").startswith("servicebusdemo") or "build" in svc:
            env = svc.get("environment", {})
            if isinstance(env, list):
                env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
            yield f"compose:{name}", {"env": [{"name": k, "value": v} for k, v in env.items()],
                                      "args": svc.get("command") or []}, None


def cmd_env(binary, compose_config, *rendered):
    names, modes, required_env = accepted_env(binary)
    if not names:
        shown = help_text(binary, [])[0].strip()
        shown = "\n  ".join(shown.splitlines()[:5]) if shown else "(nothing)"
        problem(f"{binary} --help lists no [env: NAME=] settings, so nothing can be cross-checked; it printed:\n  {shown}")
        finish()
    contract = {"OPERATION_MODE", "MESSAGE_COUNT", "AZURE_SERVICEBUS_QUEUE_NAME", "AZURE_SERVICEBUS_HOSTNAME",
                "AZURE_SERVICEBUS_CONNECTION_STRING", "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT", "METRICS_ADDR",
                "SCALER_GRPC_ADDR"}
    for name in sorted(contract - names):
        problem(f"the binary does not accept {name} (part of the documented env contract)")
    ambient = WEBHOOK_ENV | {"RUST_LOG", "SSL_CERT_FILE"}
    containers = list(manifest_containers(rendered)) + list(compose_containers(compose_config))
    for where, c, _ in containers:
        env = env_of(c)
        for name in env:
            if name not in names and name not in ambient and not name.startswith("OTEL_"):
                problem(f"{where}: sets {name}, which servicebusdemo does not accept")
        mode = env.get("OPERATION_MODE") or (c.get("args") or [None])[0]
        if mode not in modes:
            problem(f"{where}: mode {mode!r} is not one of {sorted(modes)}")
        needed = {"AZURE_SERVICEBUS_QUEUE_NAME"}
        if mode in ("producer", "consumer"):
            needed.add("MESSAGE_COUNT")
        needed |= required_env.get("", set()) | required_env.get(mode, set())
        for name in sorted(needed):
            if name not in env:
                problem(f"{where}: required setting {name} is not set")
        if not ({"AZURE_SERVICEBUS_HOSTNAME", "AZURE_SERVICEBUS_CONNECTION_STRING"} & set(env)):
            problem(f"{where}: neither AZURE_SERVICEBUS_HOSTNAME nor AZURE_SERVICEBUS_CONNECTION_STRING is set")
    print(f"{len(names)} accepted names, modes {sorted(modes)}, {len(containers)} containers checked")
    probe_configurations(binary, containers)
    finish()


def can_isolate():
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def probe_configurations(binary, containers, grace=4.0):
    """Starts the binary with each container's exact environment (plus what the workload identity webhook
    injects) in a network namespace of its own: exit code 2 means the binary refuses the configuration
    (it validates every setting before connecting); still running, or a runtime failure (exit 1, nothing to
    connect to), means it was accepted. One case without the queue name must be refused, or the probe proves
    nothing."""
    import tempfile
    import time

    if not can_isolate():
        print("configuration probe skipped: `unshare -n` unavailable (needs root); no process started")
        return
    tmp = tempfile.mkdtemp()
    token = os.path.join(tmp, "azure-identity-token")
    with open(token, "w") as f:
        f.write("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwcm9iZSJ9.c2ln")
    # File settings point into mounted Secrets that do not exist here: stand-in files of the same kind (the
    # TLS check proves the real wiring). A self-signed certificate serves as certificate and CA alike.
    stand_in = {}
    if subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                       "-nodes", "-days", "1", "-subj", "/CN=probe", "-keyout", os.path.join(tmp, "probe.key"),
                       "-out", os.path.join(tmp, "probe.crt")], capture_output=True).returncode == 0:
        stand_in = {"_KEY_FILE": os.path.join(tmp, "probe.key"), "_CERT_FILE": os.path.join(tmp, "probe.crt"),
                    "_CA_FILE": os.path.join(tmp, "probe.crt")}
    cases, seen = [], set()
    for where, c, client_id in containers:
        env = {k: v for k, v in env_of(c).items() if v is not None}
        for name in env:
            for suffix, path in stand_in.items():
                if name.startswith("SCALER_TLS_") and name.endswith(suffix):
                    env[name] = path
        if client_id:
            env.update({"AZURE_CLIENT_ID": client_id, "AZURE_TENANT_ID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                        "AZURE_FEDERATED_TOKEN_FILE": token,
                        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/"})
        key = (tuple(sorted(env.items())), tuple(c.get("args") or []))
        if key not in seen:
            seen.add(key)
            cases.append((where, env, list(c.get("args") or []), None))
    if cases:
        where, env, args, _ = cases[0]
        broken = {k: v for k, v in env.items() if k != "AZURE_SERVICEBUS_QUEUE_NAME"}
        cases.append((f"{where} without AZURE_SERVICEBUS_QUEUE_NAME", broken, args, 2))
    procs = []
    for where, env, args, expect in cases:
        full = {"PATH": "/usr/bin:/bin", "HOME": tmp, "NO_COLOR": "1", **env}
        p = subprocess.Popen(["unshare", "-n", binary, *args], env=full, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        procs.append((where, expect, p))
    deadline = time.monotonic() + grace
    refused = 0
    # The case that must be refused goes first and may take long on a loaded machine; a refusal is immediate
    # otherwise, so the others' grace period runs meanwhile.
    procs.sort(key=lambda item: item[1] is None)
    for where, expect, p in procs:
        try:
            limit = 60.0 if expect == 2 else max(0.1, deadline - time.monotonic())
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            rc = None
        out = (p.stdout.read() if p.stdout else "").strip().splitlines()
        last = re.sub(r"\x1b\[[0-9;]*m", "", out[-1]) if out else ""
        if expect == 2:
            if rc != 2:
                problem(f"probe cannot fail: {where} was not refused (exit {rc}): {last}")
        elif rc == 2:
            refused += 1
            problem(f"{where}: servicebusdemo refuses this environment (exit 2): {last}")
    print(f"{len(procs) - 1} distinct environments started with the binary, {refused} refused")


# --- compose: emulator + SQL Edge as the installer runs them, our services, the connection cap -------------
def cmd_compose(compose_config, config_json):
    with open(compose_config) as f:
        services = yaml.safe_load(f)["services"]
    emu = [n for n, s in services.items()
           if s.get("image", "").startswith("mcr.microsoft.com/azure-messaging/servicebus-emulator")]
    sql = [n for n, s in services.items() if s.get("image", "").startswith("mcr.microsoft.com/azure-sql-edge")]
    if len(emu) != 1 or len(sql) != 1:
        problem(f"expected one emulator and one azure-sql-edge service, found {emu} / {sql}")
        finish()
    e, s = services[emu[0]], services[sql[0]]
    env = e.get("environment", {})
    for k in ("ACCEPT_EULA", "SQL_SERVER", "MSSQL_SA_PASSWORD"):
        if k not in env:
            problem(f"emulator: {k} not set")
    if env.get("SQL_SERVER") != sql[0]:
        problem(f"emulator: SQL_SERVER={env.get('SQL_SERVER')!r}, expected the SQL service {sql[0]!r}")
    if env.get("MSSQL_SA_PASSWORD") != s.get("environment", {}).get("MSSQL_SA_PASSWORD"):
        problem("emulator and SQL Edge must share MSSQL_SA_PASSWORD")
    published = {str(p.get("target")) if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0]
                 for p in e.get("ports", [])}
    for port in ("5672", "5300"):
        if port not in published:
            problem(f"emulator: port {port} not published")
    mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in e.get("volumes", [])]
    if not any(m.split(":")[0] == os.path.abspath(config_json)
               and m.split(":")[1] == "/ServiceBus_Emulator/ConfigFiles/Config.json" for m in mounts):
        problem(f"emulator: {config_json} is not mounted at /ServiceBus_Emulator/ConfigFiles/Config.json")
    if "healthcheck" not in s:
        problem("SQL Edge has no health check")
    if e.get("depends_on", {}).get(sql[0], {}).get("condition") != "service_healthy":
        problem("emulator must wait for SQL Edge to be healthy")
    with open(config_json) as f:
        queues = {q["Name"] for ns in json.load(f)["UserConfig"]["Namespaces"] for q in ns.get("Queues", [])}
    hosts = {emu[0]}
    for n, net in (e.get("networks") or {}).items():
        hosts |= set((net or {}).get("aliases", []))
    connections = 0
    for name, svc in services.items():
        senv = svc.get("environment", {})
        if "OPERATION_MODE" not in senv:
            continue
        cs = senv.get("AZURE_SERVICEBUS_CONNECTION_STRING", "")
        m = re.match(r"^Endpoint=sb://([^;:/]+)[^;]*;", cs)
        if not m or m.group(1) not in hosts or "UseDevelopmentEmulator=true" not in cs:
            problem(f"{name}: connection string must point at the emulator ({sorted(hosts)}) with UseDevelopmentEmulator=true")
        if senv.get("AZURE_SERVICEBUS_QUEUE_NAME") not in queues:
            problem(f"{name}: queue {senv.get('AZURE_SERVICEBUS_QUEUE_NAME')!r} is not in {config_json} ({sorted(queues)})")
        if senv["OPERATION_MODE"] == "scaler":
            mgmt = senv.get("AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT", "")
            if not re.match(rf"^http://({'|'.join(map(re.escape, hosts))}):5300/?$", mgmt):
                problem(f"{name}: AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT {mgmt!r} is not the emulator's port 5300")
        else:
            connections += int(svc.get("scale", (svc.get("deploy") or {}).get("replicas", 1)))
        if not svc.get("read_only") or "ALL" not in svc.get("cap_drop", []):
            problem(f"{name}: should run read_only with cap_drop ALL")
        if str(svc.get("user", "0")).split(":")[0] in ("0", "root"):
            problem(f"{name}: runs as root")
    if connections > 10:
        problem(f"{connections} AMQP connections (producer + consumers) exceed the emulator's cap of 10")
    print(f"{connections} AMQP connections of the emulator's 10")
    finish()


# --- tutorial: the dry-run command sequence against the article's steps ------------------------------------
COMMON = [
    ("az group create", ["--name", "--location"]),
    ("az aks create", ["--enable-workload-identity", "--enable-oidc-issuer", "--enable-keda", "--generate-ssh-keys"]),
    ("az aks show", ["--query '[workloadAutoScalerProfile, securityProfile, oidcIssuerProfile]'"]),
    ("az aks get-credentials", ["--overwrite-existing"]),
    ("az servicebus namespace create", ["--disable-local-auth"]),
    ("az servicebus queue create", ["--namespace-name"]),
]
# The variants' NetworkPolicy needs a policy engine: their cluster gets the Cilium dataplane.
WITH_POLICY_ENGINE = [(prefix, parts + ["--network-plugin azure --network-plugin-mode overlay --network-dataplane cilium"])
                      if prefix == "az aks create" else (prefix, parts) for prefix, parts in COMMON]
KEDA_IDENTITY = [
    ("kubectl annotate serviceaccount keda-operator", ["--namespace kube-system", "azure.workload.identity/client-id=", "--overwrite"]),
    ("kubectl rollout restart deployment keda-operator", ["--namespace kube-system"]),
    ("kubectl rollout status deployment keda-operator", ["--namespace kube-system"]),
    ("KEDA_POD_ID=$(kubectl get pod", ["-l app.kubernetes.io/name=keda-operator", "jsonpath={.items[0].metadata.name}"]),
    ("kubectl describe pod", ["--namespace kube-system"]),
    ("KEDA_ENV=$(kubectl get pod", ["env[*].name"]),
]
FED = "az identity federated-credential create"
AUD = "--audience api://AzureADTokenExchange"


def role(name, who):
    return [(f"{who}_OBJECT_ID=$(az identity show", ["--query principalId"]),
            ("az role assignment create", [f"--role '{name}'", "--assignee-principal-type ServicePrincipal", "--scope"])]


def least_privilege():
    steps = [("AKS_OIDC_ISSUER=$(az aks show", ["--query oidcIssuerProfile.issuerUrl"]),
             ("SB_ID=$(az servicebus namespace show", ["--query id"])]
    for r in ("producer", "consumer", "scaler"):
        steps += [(f"{r.upper()}_CLIENT_ID=$(az identity create", ["--query clientId"]),
                  (FED, [f"--subject system:serviceaccount:default:servicebusdemo-{r}", AUD])]
    steps += role("Azure Service Bus Data Sender", "PRODUCER") + role("Azure Service Bus Data Receiver", "CONSUMER")
    steps += role("Azure Service Bus Data Owner", "SCALER")
    return steps


EXPECTED = {
    "tutorial": COMMON + [
        ("MI_CLIENT_ID=$(az identity create", ["--query clientId"]),
        ("AKS_OIDC_ISSUER=$(az aks show", ["--query oidcIssuerProfile.issuerUrl"]),
        (FED, ["--subject system:serviceaccount:default:servicebusdemo", AUD]),
        (FED, ["--subject system:serviceaccount:kube-system:keda-operator", AUD]),
        ("MI_OBJECT_ID=$(az identity show", ["--query principalId"]),
        ("SB_ID=$(az servicebus namespace show", ["--query id"]),
        ("az role assignment create", ["--role 'Azure Service Bus Data Owner'", "--assignee-object-id '<MI_OBJECT_ID>'",
                                       "--assignee-principal-type ServicePrincipal", "--scope '<SB_ID>'"]),
    ] + KEDA_IDENTITY + [("kubectl apply -k", ["/k8s/base"])],
    "external-scaler": WITH_POLICY_ENGINE + least_privilege() + [
        ("kubectl apply -k", ["/k8s/overlays/external-scaler"]),
        ("kubectl rollout status deployment servicebusdemo-scaler", [])],
    "external-scaler-tls": WITH_POLICY_ENGINE + least_privilege() + [
        ("openssl req -x509", ["-subj /CN=servicebusdemo-scaler-ca"]),
        ("openssl req -newkey", ["subjectAltName=DNS:servicebusdemo-scaler.default.svc.cluster.local",
                                 "extendedKeyUsage=serverAuth"]),
        ("openssl x509 -req", ["-copy_extensions copy"]),
        ("openssl req -newkey", ["-subj /CN=keda-operator", "extendedKeyUsage=clientAuth"]),
        ("openssl x509 -req", ["-copy_extensions copy"]),
        ("kubectl create secret generic servicebusdemo-scaler-tls", ["tls.crt=", "tls.key=", "ca.crt=", "| kubectl apply -f -"]),
        ("kubectl create secret generic servicebusdemo-keda-client-tls", ["tls.crt=", "tls.key=", "ca.crt=", "| kubectl apply -f -"]),
        ("kubectl apply -k", ["/k8s/overlays/external-scaler-tls"]),
        ("kubectl rollout status deployment servicebusdemo-scaler", [])],
    "prometheus": WITH_POLICY_ENGINE + least_privilege() + [
        ("az monitor account create", []),
        ("AMW_ID=$(az monitor account show", ["--query id"]),
        ("PROMETHEUS_QUERY_ENDPOINT=$(az monitor account show", ["--query metrics.prometheusQueryEndpoint"]),
        ("az aks update", ["--enable-azure-monitor-metrics", "--azure-monitor-workspace-resource-id '<AMW_ID>'"]),
        ("KEDA_CLIENT_ID=$(az identity create", ["--query clientId"]),
        (FED, ["--subject system:serviceaccount:kube-system:keda-operator", AUD]),
    ] + role("Monitoring Data Reader", "KEDA") + KEDA_IDENTITY + [
        ("kubectl apply -k", ["/k8s/overlays/prometheus"]),
        ("kubectl rollout status deployment servicebusdemo-scaler", [])],
    "verify": [("kubectl wait --for=condition=complete job/myproducer", []),
               ("kubectl logs job/myproducer", []),
               ("kubectl describe scaledjob myconsumer-scaledjob", []),
               ("az servicebus queue show", ["--query countDetails.activeMessageCount"]),
               ("kubectl get jobs", ["-l scaledjob.keda.sh/name=myconsumer-scaledjob"])],
    "down": [("az group delete", ["--yes", "--no-wait"]), ("kubectl config delete-context", [])],
    "acr": [("az acr create", []), ("az aks update", ["--attach-acr"]), ("az acr build", ["--image servicebusdemo:"])],
}


def cmd_sequence(name, output):
    with open(output) as f:
        lines = [l[2:].rstrip() for l in f if l.startswith("+ ")]
    expected = EXPECTED[name]
    for i, (prefix, parts) in enumerate(expected):
        if i >= len(lines):
            problem(f"step {i + 1} missing: {prefix} ...")
            continue
        line = lines[i]
        if not line.startswith(prefix):
            problem(f"step {i + 1}: expected '{prefix} ...', got '{line}'")
            continue
        for part in parts:
            if part not in line:
                problem(f"step {i + 1} ({prefix}): '{part}' missing in '{line}'")
    for extra in lines[len(expected):]:
        problem(f"unexpected command after the tutorial's steps: {extra}")
    print(f"{len(lines)} commands in order")
    finish()


def cmd_dockerfile(path):
    with open(path) as f:
        text = f.read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    if len(froms) < 2:
        problem("not multi-stage (expected a builder stage and a runtime stage)")
    elif not re.match(r"^FROM gcr\.io/distroless/cc-debian12:nonroot(\s|$)", froms[-1]):
        problem(f"final stage must be gcr.io/distroless/cc-debian12:nonroot, got '{froms[-1]}'")
    final = lines[lines.index(froms[-1]):] if froms else []
    users = [l.split(None, 1)[1] for l in final if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problem("final stage must set a non-root USER")
    exposed = {p.split("/")[0] for l in final if l.upper().startswith("EXPOSE ") for p in l.split()[1:]}
    if not {"8080", "6000"} <= exposed:
        problem(f"EXPOSE 8080 (metrics) and 6000 (scaler gRPC) expected, got {sorted(exposed)}")
    copies = [l for l in final if l.upper().startswith("COPY ")]
    if len(copies) != 1 or "--from=" not in copies[0] or "servicebusdemo" not in copies[0]:
        problem(f"final stage should copy the binary only, got {copies}")
    build = [l for l in lines if "cargo build" in l]
    if not build or not all(t in build[0] for t in ("--release", "-p servicebusdemo", "--locked")):
        problem(f"builder must run cargo build --release --locked -p servicebusdemo, got {build}")
    check_builder_rust_version(text)
    finish()


def version_tuple(text):
    return tuple(int(part) for part in (text.split(".") + ["0", "0"])[:3])


def check_builder_rust_version(dockerfile_text):
    """The builder's Rust is the declared rust-version, and every locked crate builds with it
    (cargo refuses a crate whose rust-version is newer, so `--locked` would fail in the image)."""
    arg = re.search(r"^ARG RUST_VERSION=(\S+)", dockerfile_text, re.M)
    with open("Cargo.toml") as f:
        declared = re.search(r'^rust-version\s*=\s*"([^"]+)"', f.read(), re.M)
    if not arg or not declared:
        problem("Dockerfile ARG RUST_VERSION and Cargo.toml rust-version are both expected")
        return
    if arg.group(1) != declared.group(1):
        problem(f"Dockerfile builds with Rust {arg.group(1)}, Cargo.toml declares {declared.group(1)}")
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        capture_output=True, text=True,
    )
    if metadata.returncode != 0:
        problem(f"cargo metadata failed: {metadata.stderr.strip()[-300:]}")
        return
    rust = version_tuple(arg.group(1))
    newer = [
        f"{p['name']} {p['version']} needs {p['rust_version']}"
        for p in json.loads(metadata.stdout)["packages"]
        if p.get("rust_version") and version_tuple(p["rust_version"]) > rust
    ]
    if newer:
        problem(f"Cargo.lock has crates the image's Rust {arg.group(1)} cannot build: {'; '.join(newer)}")
    else:
        print(f"every locked crate builds with Rust {arg.group(1)}")


# --- tls-probe: the scaler serves mutual TLS with the certificates tutorial.sh makes, wired as the overlay does --
def secret_files(secrets, name, tmp):
    """Writes every key of Secret `name` to tmp/name/KEY; returns {key: path}."""
    import base64

    secret = secrets.get(name)
    if secret is None:
        problem(f"Secret {name} was not created")
        return {}
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
    out = {}
    for key, value in (secret.get("data") or {}).items():
        path = os.path.join(tmp, name, key)
        with open(path, "wb") as f:
            f.write(base64.b64decode(value))
        out[key] = path
    return out


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def h2_settings_received(host, port, server_name, ca, cert=None, key=None):
    """TLS handshake with ALPN h2, then the HTTP/2 preface: True when the server answers with a frame. With
    TLS 1.3 a server that wants a client certificate rejects a missing one only after the handshake."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    if cert:
        ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
                return len(tls.recv(9)) == 9
    except (OSError, ssl.SSLError):
        return False


def cmd_tls_probe(binary, rendered, secrets_yaml):
    import tempfile
    import time

    docs = load(rendered)
    with open(secrets_yaml) as f:
        secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(f) if d and d.get("kind") == "Secret"}
    tmp = tempfile.mkdtemp()
    scaler = by_kind(docs, "Deployment")["servicebusdemo-scaler"]
    pod = scaler["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    env = {k: v for k, v in env_of(container).items() if v is not None}
    # Each *_FILE setting names a file of a mounted Secret: resolve it to that Secret's key, as the kubelet would.
    for name, path in list(env.items()):
        if not name.startswith("SCALER_TLS_"):
            continue
        mount = next((m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        volume = mount and volumes.get(mount["name"], {}).get("secret")
        if not volume:
            problem(f"{name}={path} is not inside a mounted Secret")
            continue
        files = secret_files(secrets, volume["secretName"], tmp)
        key = os.path.relpath(path, mount["mountPath"])
        if key not in files:
            problem(f"{name}: Secret {volume['secretName']} has no key {key!r} (has {sorted(files)})")
            continue
        env[name] = files[key]
    trigger = by_kind(docs, "ScaledJob")["myconsumer-scaledjob"]["spec"]["triggers"][0]
    server_name = trigger["metadata"]["scalerAddress"].rsplit(":", 1)[0]
    auth = by_kind(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    client = {}
    for ref in auth["spec"]["secretTargetRef"]:
        client[ref["parameter"]] = secret_files(secrets, ref["name"], tmp).get(ref["key"])
    if problems or None in client.values():
        problem(f"KEDA's client TLS material incomplete: {client}")
        finish()
    grpc_port, metrics_port = free_port(), free_port()
    env.update({"PATH": "/usr/bin:/bin", "HOME": tmp, "NO_COLOR": "1",
                "AZURE_SERVICEBUS_HOSTNAME": "127.0.0.1:1",
                "AZURE_SERVICEBUS_CONNECTION_STRING":
                    "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=probe;SharedAccessKey=cHJvYmU=;UseDevelopmentEmulator=true",
                "AZURE_SERVICEBUS_MANAGEMENT_ENDPOINT": "http://127.0.0.1:1/",
                "SCALER_GRPC_ADDR": f"127.0.0.1:{grpc_port}", "METRICS_ADDR": f"127.0.0.1:{metrics_port}"})
    env.pop("AZURE_SERVICEBUS_HOSTNAME")
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import socket

        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                problem(f"the scaler exited ({proc.returncode}) with the overlay's TLS settings:\n{proc.stdout.read()}")
                finish()
            try:
                socket.create_connection(("127.0.0.1", grpc_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    problem("the scaler's gRPC port did not open within 30 s")
                    finish()
                time.sleep(0.2)
        if not h2_settings_received("127.0.0.1", grpc_port, server_name, client["caCert"],
                                    client["tlsClientCert"], client["tlsClientKey"]):
            problem(f"KEDA's client certificate was not accepted, or the server certificate does not verify for {server_name}")
        if h2_settings_received("127.0.0.1", grpc_port, server_name, client["caCert"]):
            problem("the scaler accepted a client without a certificate: mutual TLS is not enforced")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not problems:
        print(f"scaler on TLS: KEDA's certificate accepted for {server_name}, a client without one refused")


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
    # A command that returns early (nothing more to check) still reports what it found.
    finish()
