"""Fake cluster hosts for the launch tests: network namespaces, and a real slurm on them.

:class:`NetnsHosts` makes N "hosts" on this machine. Each is a network namespace with its
own address on one veth pair (10.231.1.1 and 10.231.1.2), its own hostname (UTS namespace) and an ``/etc/hosts``
that names every host, bind-mounted privately; a command runs "on" host i through
``nsenter --net=/run/netns/NS unshare --uts --mount``.

:class:`SlurmCluster` starts munged (private key and socket), slurmctld on host 0 and one
slurmd per host, from a config generated in a temp dir; it submits with sbatch and waits
with scontrol. Both clean up every daemon and namespace they made, by pid and by name.

All traffic stays inside the namespaces made here (addresses 10.231.x.y on the veth link).
"""
import os
import shutil
import subprocess
import tempfile
import time

APT_PACKAGES = {"ip": "iproute2", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm",
                "munged": "munge", "nsenter": "util-linux", "unshare": "util-linux"}


def ensure_tools(binaries) -> str:
    """Install the Debian packages providing ``binaries`` if any is missing; '' or the error text."""
    missing = [b for b in binaries if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if not missing:
        return ""
    if os.geteuid() != 0:
        return f"not root: cannot apt-get install {missing}"
    pkgs = sorted({APT_PACKAGES[b] for b in missing})
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        if p.returncode != 0:
            return f"{' '.join(cmd)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}"
    return ""


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (slurmstepd, torchrun, ranks)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _run(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class NetnsHosts:
    """Two hosts in network namespaces joined by a veth pair (see module docstring)."""

    def __init__(self, n: int = 2, *, workdir: str):
        assert n == 2, "one veth pair joins exactly two hosts"
        self.n, self.tag = n, f"{os.getpid() % 100000}"
        self.ns = [f"mrl{self.tag}h{i}" for i in range(n)]
        self.names = [f"node{i}-{self.tag}" for i in range(n)]
        self.addrs = [f"10.231.1.{i + 1}" for i in range(n)]
        self.workdir = workdir
        self.hosts_file = os.path.join(workdir, "hosts")
        self.procs = []

    def __enter__(self):
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self):
        for ns in self.ns:
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        a, b = f"mrl{self.tag}a", f"mrl{self.tag}b"
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for ns, dev, addr in ((self.ns[0], a, self.addrs[0]), (self.ns[1], b, self.addrs[1])):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addrs, self.names)))

    def argv(self, i: int, cmd) -> list:
        """``cmd`` run on host i: its namespace, hostname and /etc/hosts."""
        inner = f"hostname {self.names[i]} && mount --bind {self.hosts_file} /etc/hosts && exec \"$@\""
        # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts slurmd needs.
        return ["nsenter", f"--net=/run/netns/{self.ns[i]}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", inner, "sh", *cmd]

    def popen(self, i: int, cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(i, cmd), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, i: int, cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, cmd), capture_output=True, text=True, **kw)

    def close(self):
        for p in self.procs:
            kill_tree(p.pid)
            p.wait(timeout=10)
        for ns in self.ns:
            _run("ip", "netns", "del", ns, check=False)

    def __exit__(self, *exc):
        self.close()


class SlurmCluster:
    """munged + slurmctld + one slurmd per host, config in ``workdir`` (see module docstring)."""

    def __init__(self, hosts: NetnsHosts, *, workdir: str):
        self.h, self.dir = hosts, workdir
        # slurmstepd's unix sockets live in the spool dir, whose path must stay under 108 bytes:
        # a short directory of its own, not the (long, numbered) pytest tmp path
        self.spool = tempfile.mkdtemp(prefix="mrl-slurm-", dir="/tmp")
        self.conf = os.path.join(workdir, "slurm.conf")
        self.sock = os.path.join(workdir, "munge.sock")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.daemons = []

    def _write_conf(self):
        d, h = self.dir, self.h
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} State=UNKNOWN\n"
                        for n, a in zip(h.names, h.addrs))
        text = f"""ClusterName=mrltest
SlurmctldHost={h.names[0]}({h.addrs[0]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={self.spool}/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=10 State=UP OverSubscribe=YES
"""
        os.makedirs(os.path.join(d, "state"), exist_ok=True)
        for n in h.names:
            os.makedirs(os.path.join(self.spool, n), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(text)

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self):
        self._write_conf()
        key = os.path.join(self.dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        munged = shutil.which("munged") or "/usr/sbin/munged"
        log = open(os.path.join(self.dir, "daemons.log"), "a")
        self.daemons.append(subprocess.Popen(
            [munged, "-F", "-f", f"--socket={self.sock}", f"--key-file={key}", f"--pid-file={self.dir}/munged.pid",
             f"--seed-file={self.dir}/munged.seed", f"--log-file={self.dir}/munged.log"],
            stdout=log, stderr=log, start_new_session=True))
        _wait(lambda: os.path.exists(self.sock), 20, "munged socket")
        self.daemons.append(self.h.popen(0, ["slurmctld", "-D", "-f", self.conf], env=self.env, stdout=log, stderr=log))
        for i, name in enumerate(self.h.names):
            self.daemons.append(self.h.popen(i, ["slurmd", "-D", "-f", self.conf, "-N", name], env=self.env,
                                             stdout=log, stderr=log))
        _wait(self._nodes_idle, 60, "slurm nodes idle", self._diag)

    def _nodes_idle(self) -> bool:
        p = self.h.run(0, ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env)
        states = [ln.split()[1] for ln in p.stdout.splitlines() if ln.strip()]
        return len(states) == self.h.n and all(s.startswith("idle") for s in states)

    def _diag(self) -> str:
        out = []
        for name in ("daemons.log", "slurmctld.log", *[f"slurmd-{n}.log" for n in self.h.names]):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + "".join(open(path).readlines()[-15:]))
        return "\n".join(out)

    def sbatch(self, args, *, env, cwd) -> str:
        p = self.h.run(0, ["sbatch", "--parsable", *args], env=dict(env, SLURM_CONF=self.conf), cwd=cwd, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed: {p.stderr.strip()}\n{self._diag()}")
        return p.stdout.strip().split(";")[0]

    def wait_job(self, job_id: str, timeout: float) -> dict:
        """Poll ``scontrol show job`` until the job ends; its fields as a dict."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.h.run(0, ["scontrol", "-o", "show", "job", job_id], env=self.env)
            fields = dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)
            if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurm job {job_id} still {fields.get('JobState')} after {timeout} s\n{self._diag()}")
            time.sleep(0.5)

    def close(self):
        for p in reversed(self.daemons):
            kill_tree(p.pid)
            p.wait(timeout=10)
        shutil.rmtree(self.spool, ignore_errors=True)

    def __exit__(self, *exc):
        self.close()


def _wait(pred, timeout: float, what: str, diag=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        time.sleep(0.3)
