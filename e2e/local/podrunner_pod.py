"""What a kubelet derives from a Pod: the container's env, volume contents, security settings
and mounts, and the in-namespace set-up of the container (`container_init`). Used by the
`podrunner` script next to this file (test code, not product; stdlib only)."""
import base64, json, os, re, shutil, socket, subprocess, sys, time

SA_DIR, HOME = "/var/run/secrets/kubernetes.io/serviceaccount", "/run/podrunner/home"
DEFAULT_CAPS = ("chown dac_override fowner fsetid kill setgid setuid setpcap net_bind_service net_raw sys_chroot "
                "mknod audit_write setfcap").split()  # a container runtime's default capability set


class Err(Exception):
    pass


def die(msg):
    print(f"podrunner: {msg}", file=sys.stderr)
    sys.exit(1)


def run(argv, check=True, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise Err(f"{' '.join(argv[:6])}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return default


def save(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------ the pod spec
def field(pod, path):
    md, spec, ip = pod["metadata"], pod["spec"], pod.get("status", {}).get("podIP", "")
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return md.get(m[1], {}).get(m[2], "")
    if path in ("metadata.labels", "metadata.annotations"):
        return "\n".join(f'{k}="{v}"' for k, v in sorted(md.get(path[9:], {}).items()))
    vals = {"metadata.name": md.get("name"), "metadata.namespace": md.get("namespace"), "metadata.uid": md.get("uid"),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"), "spec.nodeName": "podrunner",
            "status.podIP": ip, "status.podIPs": ip, "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1"}
    if path not in vals:
        raise Err(f"unsupported fieldRef {path}")
    return vals[path] or ""


def expand(s, env):
    """Kubernetes $(VAR) expansion: defined vars replaced, others left as they are; $$ -> $."""
    out, i = [], 0
    while i < len(s):
        j = s.find(")", i)
        if s.startswith("$$", i):
            out.append("$"); i += 2
        elif s.startswith("$(", i) and j > 0:
            out.append(env.get(s[i + 2:j], s[i:j + 1])); i = j + 1
        else:
            out.append(s[i]); i += 1
    return "".join(out)


def obj_data(h, kind, name, ns):
    o = h.get(kind, name, ns)
    if o is None:
        return None
    data = {k: (base64.b64decode(v) if kind == "secret" else v.encode()) for k, v in (o.get("data") or {}).items()}
    return {**data, **{k: base64.b64decode(v) for k, v in (o.get("binaryData") or {}).items()}}


def key_ref(h, kind, ref, ns):
    data = obj_data(h, kind, ref["name"], ns)
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise Err(f"{kind} {ns}/{ref['name']} or its key {ref['key']!r} not found")
    return data[ref["key"]].decode()


def container_env(h, pod, c):
    p, ns = str(h.api_port), pod["metadata"]["namespace"]
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": p, "KUBERNETES_SERVICE_PORT_HTTPS": p,
           "KUBERNETES_PORT": f"tcp://127.0.0.1:{p}", f"KUBERNETES_PORT_{p}_TCP": f"tcp://127.0.0.1:{p}",
           f"KUBERNETES_PORT_{p}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{p}_TCP_PORT": p,
           f"KUBERNETES_PORT_{p}_TCP_ADDR": "127.0.0.1"}
    for ef in c.get("envFrom") or []:
        kind, ref = ("configmap", ef["configMapRef"]) if "configMapRef" in ef else ("secret", ef["secretRef"])
        data = obj_data(h, kind, ref["name"], ns)
        if data is None and not ref.get("optional"):
            raise Err(f"envFrom {kind} {ns}/{ref['name']} not found")
        env.update({ef.get("prefix", "") + k: v.decode() for k, v in (data or {}).items()})
    for e in c.get("env") or []:
        vf = e.get("valueFrom") or {}
        if "fieldRef" in vf:
            v = field(pod, vf["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in vf:
            v = key_ref(h, "secret", vf["secretKeyRef"], ns)
        elif "configMapKeyRef" in vf:
            v = key_ref(h, "configmap", vf["configMapKeyRef"], ns)
        else:  # plain value; resourceFieldRef (no limits known here) gives "0"
            v = "0" if vf else expand(e.get("value", ""), env)
        if v is not None:
            env[e["name"]] = v
    return env


def sa_token(h, pod, audience=None, seconds=3600):
    md = pod["metadata"]
    args = ["create", "token", pod["spec"].get("serviceAccountName", "default"), "-n", md["namespace"],
            f"--duration={max(int(seconds), 600)}s", "--bound-object-kind=Pod", f"--bound-object-name={md['name']}",
            f"--bound-object-uid={md['uid']}", *(["--audience", audience] if audience else [])]
    return h.kubectl(*args).strip().encode()


def keyed_files(h, kind, src, ns, mode):
    name = src.get("name") or src.get("secretName")
    data = obj_data(h, kind, name, ns)
    if data is None and not src.get("optional"):
        raise Err(f"{kind} {ns}/{name} not found")
    out = {}
    for it in src.get("items") or [{"key": k, "path": k} for k in data or {}]:
        if it["key"] in (data or {}):
            out[it["path"]] = (data[it["key"]], it.get("mode", mode))
        elif not src.get("optional"):
            raise Err(f"{kind} {ns}/{name} has no key {it['key']!r}")
    return out


def volume_files(h, pod, vol):
    ns, files = pod["metadata"]["namespace"], {}
    for kind, key in (("configmap", "configMap"), ("secret", "secret")):
        if key in vol:
            return keyed_files(h, kind, vol[key], ns, vol[key].get("defaultMode", 0o644))
    spec = vol.get("projected") or vol.get("downwardAPI")
    if spec is None:
        raise Err(f"unsupported volume {vol}")
    mode = spec.get("defaultMode", 0o644)
    for src in spec.get("sources") or [{"downwardAPI": spec}]:
        if "serviceAccountToken" in src:
            t = src["serviceAccountToken"]
            files[t["path"]] = (sa_token(h, pod, t.get("audience"), t.get("expirationSeconds", 3600)), mode)
        elif "configMap" in src or "secret" in src:
            kind, key = ("configmap", "configMap") if "configMap" in src else ("secret", "secret")
            files.update(keyed_files(h, kind, src[key], ns, mode))
        elif "downwardAPI" in src:
            files.update({it["path"]: (field(pod, it["fieldRef"]["fieldPath"]).encode(), it.get("mode", mode))
                          for it in src["downwardAPI"].get("items") or [] if "fieldRef" in it})
        else:
            raise Err(f"unsupported projected source {src}")
    return files


def atomic_write(dest, files, gid=None):
    """The kubelet's AtomicWriter layout: dest/..<ts>/files, dest/..data -> ..<ts>, dest/top -> ..data/top."""
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o755)
    ts = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.time_ns() % 10**9}"
    os.makedirs(f"{dest}/{ts}", mode=0o755)
    for rel, (data, mode) in files.items():
        p = f"{dest}/{ts}/{rel}"
        os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, (mode & 0o777) | (0o040 if gid is not None else 0))
        if gid is not None:
            os.chown(p, -1, gid)
    os.symlink(ts, f"{dest}/..data_tmp")
    os.replace(f"{dest}/..data_tmp", f"{dest}/..data")
    tops = {rel.split("/")[0] for rel in files}
    for e in os.listdir(dest):
        if e.startswith("..") and e not in ("..data", ts):
            shutil.rmtree(f"{dest}/{e}", ignore_errors=True)
        elif not e.startswith("..") and e not in tops:
            os.unlink(f"{dest}/{e}")
    for t in tops - set(os.listdir(dest)):
        os.symlink(f"..data/{t}", f"{dest}/{t}")


def materialise(h, d, pod, names, timeout=30):
    """Writes the named volumes to d/vol/NAME, retrying up to timeout s for objects not there yet."""
    gid, deadline = (pod["spec"].get("securityContext") or {}).get("fsGroup"), time.time() + timeout
    for vol in (v for v in pod["spec"].get("volumes") or [] if v["name"] in names):
        dest = f"{d}/vol/{vol['name']}"
        if "emptyDir" in vol:
            os.makedirs(dest, exist_ok=True)
            os.chmod(dest, 0o777)
            continue
        if "hostPath" in vol:  # e.g. /dev/net/tun for TUN mode; bind-mounted through this link
            os.makedirs(f"{d}/vol", exist_ok=True)
            os.path.lexists(dest) or os.symlink(vol["hostPath"]["path"], dest)
            continue
        while True:
            try:
                atomic_write(dest, volume_files(h, pod, vol), gid)
                break
            except Err as e:
                if time.time() > deadline:
                    raise Err(f"volume {vol['name']}: {e}")
                time.sleep(0.5)


def find_container(pod, name):
    for c in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise Err(f"pod has no container {name!r}")


def security(pod, c):
    """(setpriv argv prefix, read-only rootfs) from the pod and container securityContext."""
    ps, cs = pod["spec"].get("securityContext") or {}, c.get("securityContext") or {}
    pick = lambda k: cs.get(k, ps.get(k))
    uid, gid = pick("runAsUser") or 0, pick("runAsGroup") or 0
    if pick("runAsNonRoot") and uid == 0:
        raise Err("runAsNonRoot is set but the container would run as root")
    groups = [*(ps.get("supplementalGroups") or []), *([ps["fsGroup"]] if "fsGroup" in ps else [])]
    norm = lambda caps: {x.lower().removeprefix("cap_") for x in caps or []}
    drop, add = norm((cs.get("capabilities") or {}).get("drop")), norm((cs.get("capabilities") or {}).get("add"))
    keep = sorted(((set() if "all" in drop else set(DEFAULT_CAPS) - drop) | add) - {"all"})
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
    argv += [] if cs.get("privileged") else ["--bounding-set=-all" + "".join(f",+{k}" for k in keep)]
    argv += ["--no-new-privs"] if cs.get("allowPrivilegeEscalation") is False else []
    return argv + ["--"], bool(cs.get("readOnlyRootFilesystem"))


def init_spec(h, meta, attempt):
    """What _init needs to become the container; resolved again for every (re)start."""
    pod = load(f"{meta['dir']}/pod.json")
    c = find_container(pod, meta["container"])
    env = container_env(h, pod, c)
    cmd = c.get("command") or (["containerboot"] if "tailscale" in c.get("image", "") else None)
    if not cmd:
        raise Err("the container has no command and podrunner knows no entrypoint for its image")
    setpriv, ro = security(pod, c)
    mounts = [{"src": f"{meta['dir']}/vol/{m['name']}", "dst": m["mountPath"], "ro": bool(m.get("readOnly"))}
              for m in c.get("volumeMounts") or []] + [{"src": f"{meta['dir']}/home", "dst": HOME, "ro": False}]
    return {"hostname": meta["pod"], "mounts": mounts, "rootfs_ro": ro, "workdir": c.get("workingDir") or "/",
            "rootdir": f"{meta['dir']}/rootfs/{attempt}", "tools": h.tools,
            "env": {**h.image_env(HOME), "HOSTNAME": meta["pod"], **env},
            "argv": setpriv + [expand(x, env) for x in cmd + (c.get("args") or [])]}


# ------------------------------------------------------------------------------ inside the namespaces
def container_init(specfile):
    """PID 1 of the container's private mount/UTS/PID namespaces. Its root is the host / as a
    copy-on-write overlay (upper on a tmpfs: writes never reach the host and vanish with the
    container, like a container's writable layer), with fresh /proc and /run, the host's /dev and
    /sys (ro), the tool dir (ro) and the volumes; then chroot and exec."""
    s = load(specfile)
    socket.sethostname(s["hostname"])
    mount = lambda *a: run(["mount", "-n", *a])  # -n: no /run/mount/utab
    base = s["rootdir"]
    root = f"{base}/root"
    os.makedirs(base)
    mount("-t", "tmpfs", "-o", "mode=0700", "podrunner", base)
    for sub in ("upper", "work", "root"):
        os.mkdir(f"{base}/{sub}")
    mount("-t", "overlay", "-o", f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", "podrunner", root)
    mount("-t", "proc", "proc", f"{root}/proc")
    mount("-t", "tmpfs", "-o", "mode=0755", "podrunner", f"{root}/run")
    mounts = [{"src": "/dev", "dst": "/dev"}, {"src": "/sys", "dst": "/sys", "ro": True},
              # The whole tool dir: bin/ holds relative links into its versioned siblings, and a
              # volume (e.g. the emptyDir on /tmp) may hide the host path it lives under.
              {"src": os.path.dirname(s["tools"]), "dst": os.path.dirname(s["tools"]), "ro": True}, *s["mounts"]]
    for m in sorted(mounts, key=lambda m: os.path.realpath(m["dst"]).count("/")):
        dst = root + os.path.realpath(m["dst"])
        if not os.path.lexists(dst):
            os.makedirs(dst if os.path.isdir(m["src"]) else os.path.dirname(dst), mode=0o755, exist_ok=True)
            os.path.exists(dst) or open(dst, "w").close()
        mount("--rbind", m["src"], dst)
        if m.get("ro"):
            mount("-o", "remount,bind,ro", dst)
    if s["rootfs_ro"]:
        mount("-o", "remount,bind,ro", root)
    os.chroot(root)
    os.chdir(s["workdir"])
    os.execvpe(s["argv"][0], s["argv"], s["env"])
