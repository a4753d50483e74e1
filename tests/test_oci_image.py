"""Bring your own image: transports, the image config as `docker run` applies it, and layer
effects, pure where they can be, and for real: archives made here (no registry) unpacked by
umoci and booted; Dockerfiles built by buildah; bad inputs as one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import data_digest, qemubox
from oci_factory import Entry, docker_archive, layer_tar, oci_layout, tar_dir
from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.image import dockerfile, export, reference
from qemubox.image.ociconfig import ImageConfig, command, resolve_user
from qemubox.service import actions
from qemubox.service.command import CommandRequest, for_image
from qemubox.service.session import SessionRequest

# --- pure ---------------------------------------------------------------------------------------


def test_references_name_their_transport_and_a_path_that_is_there(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"x")
    (tmp_path / "lay").mkdir()
    (tmp_path / "lay" / "oci-layout").write_text("{}")
    ref = reference.parse("oci-archive:a.tar", tmp_path)
    assert ref.skopeo() == f"oci-archive:{tmp_path}/a.tar"
    assert reference.parse("docker-archive:a.tar", tmp_path).transport == "docker-archive"
    lay = reference.parse("oci:./lay:1.2", tmp_path)
    assert (lay.target, lay.tag) == (str(tmp_path / "lay"), "1.2")
    assert reference.parse("oci:lay", tmp_path).tag == ""
    assert reference.parse("containers-storage:app:1").skopeo() == "containers-storage:app:1"
    assert reference.looks_like("oci:./x") and not reference.looks_like("./disk.img")
    assert not reference.looks_like("debian")


@pytest.mark.parametrize(
    "text, words",
    [
        ("docker://alpine", "reads no registry"),
        ("zip:app.zip", "unknown transport 'zip'"),
        ("oci-archive:missing.tar", "no such file"),
        ("oci:nowhere:1", "not an OCI image layout"),
        ("oci-archive:", "nothing after"),
    ],
)
def test_a_bad_reference_is_one_line_naming_it(tmp_path, text, words):
    with pytest.raises(InputError) as err:
        reference.parse(text, tmp_path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_entrypoint_and_cmd_apply_as_docker_run_applies_them():
    c = ImageConfig(entrypoint=("/app",), cmd=("--serve",))
    assert command(c, ()) == ("/app", "--serve")
    assert command(c, ("-V",)) == ("/app", "-V")  # args replace Cmd
    assert command(c, (), entrypoint="/bin/sh") == ("/bin/sh",)  # an override drops Cmd
    assert command(c, ("-c", "id"), entrypoint="/bin/sh") == ("/bin/sh", "-c", "id")
    assert command(ImageConfig(cmd=("sh",)), ("ls",)) == ("ls",)
    assert command(c, ("x",), entrypoint="") == ("x",)  # "" clears the entrypoint
    with pytest.raises(InputError, match="no Entrypoint or Cmd"):
        command(ImageConfig(), ())


def test_env_workdir_and_user_defaults_come_from_the_image():
    config = ImageConfig(env=("PATH=/bin", "A=1"), workdir="/w", user="app").to_dict()
    run = for_image(CommandRequest((), {"A": "2"}), config | {"cmd": ["id"]}, run=True)
    assert (run.argv, run.env, run.cwd, run.user) == (
        ("id",),
        {"PATH": "/bin", "A": "2"},
        "/w",
        "app",
    )
    given = for_image(CommandRequest(("ls",), cwd="/tmp", user="0"), config, run=False)
    assert (given.cwd, given.user) == ("/tmp", "0")
    plain = for_image(CommandRequest(("ls",)), None, run=False)
    assert (plain.cwd, plain.user, plain.env) == ("/", None, {})


def test_a_run_with_no_command_needs_an_image_that_has_one():
    with pytest.raises(InputError, match="image debian has no Entrypoint or Cmd"):
        actions.Run(CommandRequest(()), SessionRequest(image="debian"))
    actions.Run(CommandRequest(()), SessionRequest(image="oci-archive:app.tar"))


PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napps:x:1001:\nwheel:x:10:app,other\nstaff:x:50:other\n"


def test_users_resolve_as_docker_resolves_them():
    assert resolve_user("", PASSWD, GROUP).to_tuple() == (0, 0, (0,))
    app = resolve_user("app", PASSWD, GROUP)
    assert app.to_tuple() == (1000, 1001, (1001, 10)) and app.home == "/home/app"
    assert resolve_user("1000", PASSWD, GROUP).to_tuple() == (1000, 1001, (1001, 10))
    assert resolve_user("4242", PASSWD, GROUP).to_tuple() == (4242, 0, (0,))
    assert resolve_user("app:staff", PASSWD, GROUP).to_tuple() == (1000, 50, (50,))
    assert resolve_user("7:8", "", "").to_tuple() == (7, 8, (8,))
    assert resolve_user("root", "", "").to_tuple() == (0, 0, (0,))  # no passwd at all
    for bad, words in [("nobody", "not in the image's /etc/passwd"), ("app:nogroup", "group")]:
        with pytest.raises(InputError, match=words):
            resolve_user(bad, PASSWD, GROUP)


def test_from_lines_are_rewritten_but_stages_scratch_and_args():
    text = (
        "ARG BASE=debian\nFROM debian AS build\nRUN make\n"
        "FROM --platform=linux/amd64 build\nFROM scratch\nfrom $BASE\nFROM app:1 as x\n"
    )
    out = dockerfile.rewrite_from(text, lambda image: f"oci-archive:/c/{image}.tar")
    assert out.splitlines() == [
        "ARG BASE=debian",
        "FROM oci-archive:/c/debian.tar AS build",
        "RUN make",
        "FROM --platform=linux/amd64 build",
        "FROM scratch",
        "from $BASE",
        "FROM oci-archive:/c/app:1.tar as x",
    ]
    with pytest.raises(InputError, match="--build-arg 'X'"):
        dockerfile.parse_build_args(("X",))


def test_an_image_config_survives_export_as_umoci_options():
    c = ImageConfig(env=("A=1",), workdir="/w", user="app", entrypoint=("/e",), cmd=("a", "b"))
    args = export.config_args(c, arches.get("x86_64"))
    assert args[:5] == ["--architecture", "amd64", "--os", "linux", "--no-history"]
    assert args[5:] == [
        "--config.env=A=1", "--config.workingdir=/w", "--config.user=app",
        "--config.entrypoint=/e", "--config.cmd=a", "--config.cmd=b",
    ]  # fmt: skip


def test_a_malformed_config_is_one_line():
    with pytest.raises(InputError, match="Env is not a list of strings"):
        ImageConfig.from_oci({"config": {"Env": "A=1"}})
    c = ImageConfig.from_oci({"architecture": "arm64", "config": {"Cmd": ["x"]}})
    assert (c.architecture, c.cmd, c.entrypoint) == ("arm64", ("x",), None)


# --- for real -----------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "ls", "id", "stat", "echo", "pwd", "test", "wc", "printenv", "touch")
SCRIPT = 'echo "$GREETING from $(pwd) as $(id -u):$(id -g) home $HOME"; cat /etc/motd'
CONFIG = {
    "Env": ["PATH=/bin", "GREETING=hello"],
    "WorkingDir": "/work",
    "User": "app",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": [SCRIPT],
}


def app_layers() -> list[bytes]:
    """Two layers: a busybox-only root (no libc at all), then every effect a layer has."""
    first = [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
        *(Entry(f"bin/{a}", "symlink", target="busybox") for a in APPLETS),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=PASSWD.encode()),
        Entry("etc/group", data=GROUP.encode()),
        Entry("etc/motd", data=b"one\n"),
        Entry("home", "dir", mode=0o755),
        Entry("home/app", "dir", mode=0o700, uid=1000, gid=1001),
        Entry("data", "dir", mode=0o755),
        Entry("data/gone.txt", data=b"gone\n"),
        Entry("data/kept.txt", data=b"kept\n"),
        Entry("opq", "dir", mode=0o755),
        Entry("opq/a", data=b"a"),
        Entry("opq/b", data=b"b"),
    ]
    second = [
        Entry("etc/motd", data=b"two\n"),
        Entry("data/.wh.gone.txt"),
        Entry("data/new.txt", data=b"new\n", xattrs={"user.origin": "layer2"}),
        Entry("data/hard", "hardlink", target="data/new.txt"),
        Entry("data/link", "symlink", target="new.txt"),
        Entry("data/owned", data=b"mine\n", mode=0o640, uid=1000, gid=1001),
        Entry("opq/.wh..wh..opq"),
        Entry("opq/c", data=b"c"),
    ]
    return [layer_tar(first), layer_tar(second)]


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("oci")
    layers, arch = app_layers(), arches.host().oci_arch
    layout = oci_layout(d / "layout", layers, CONFIG, arch, "1.2")
    return {
        "layout": layout,
        "oci": tar_dir(layout, d / "app.oci.tar"),
        "docker": docker_archive(d / "app.docker.tar", layers, CONFIG, arch),
        "arm": tar_dir(oci_layout(d / "arm", layers, CONFIG, "riscv64", "1"), d / "arm.tar"),
    }


EFFECTS = (
    "test -e /data/gone.txt || echo whiteout; ls /opq | tr '\\n' ' '; echo; "
    "cat /data/link /data/kept.txt; stat -c %h /data/new.txt; "
    "test $(stat -c %i /data/hard) = $(stat -c %i /data/new.txt) && echo hardlinked; "
    "stat -c '%u:%g %a' /data/owned /home/app; cat /etc/resolv.conf | wc -l; "
    "touch /written && echo root-writable || echo not-root"
)


@pytest.mark.kernel
@pytest.mark.qemu
def test_an_oci_archive_runs_its_entrypoint_and_cmd_with_its_config(kernel, archives, state):
    before = data_digest(archives["oci"])
    image = f"oci-archive:{archives['oci']}"
    r = qemubox("run", "--kernel", kernel, "--image", image)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["hello from /work as 1000:1001 home /home/app", "two"]
    r = qemubox("run", "--kernel", kernel, "--image", image, "-u", "root", "--", EFFECTS)
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "whiteout", "c ", "new", "kept", "2", "hardlinked", "1000:1001 640", "1000:1001 700",
        "1", "root-writable",
    ]  # fmt: skip
    r = qemubox("run", "--kernel", kernel, "--image", image, "--", "test -e /written; echo $?")
    assert (r.code, r.out) == (0, "1\n"), r.err  # a run never sees another's writes
    r = qemubox(
        "run", "--kernel", kernel, "--image", image, "--entrypoint", "/bin/echo", "-w", "/opq",
        "--", "args", "replace", "cmd",
    )  # fmt: skip
    assert (r.code, r.out) == (0, "args replace cmd\n"), r.err
    r = qemubox("run", "--kernel", kernel, "--image", image, "--", "touch /x; exit 3")
    assert r.code == 3 and "Permission denied" in r.err  # app may not write /
    r = qemubox("run", "--kernel", kernel, "--image", image, "-u", "nobody", "--", "id")
    assert r.code == 2, r.err
    assert (
        r.err.splitlines()[-1] == "qemubox: error: user 'nobody' is not in the image's /etc/passwd"
    )
    assert data_digest(archives["oci"]) == before  # the archive is never written


@pytest.mark.kernel
@pytest.mark.qemu
def test_the_python_api_runs_commands_as_a_user_by_name_or_ids(kernel, archives):
    from qemubox import Sandbox, Session

    with Sandbox(Session(image=f"oci-archive:{archives['oci']}", kernel=kernel)) as box:
        script = ["/bin/sh", "-c", 'echo "$(id -u):$(id -g) $HOME"']
        assert box.exec(script).stdout == b"0:0 /root\n"  # the API runs as root unless told
        assert box.exec(script, user="app").stdout == b"1000:1001 /home/app\n"
        r = box.exec(["/bin/id", "-G"], user=(4242, 7, (7, 10)))
        assert r.stdout.split() == [b"7", b"10"]


@pytest.mark.kernel
@pytest.mark.qemu
def test_one_image_by_any_transport_and_name_is_unpacked_once(kernel, archives, state, tmp_path):
    storage = f"containers-storage:[vfs@{tmp_path}/root+{tmp_path}/run]localhost/app:1"
    copied = subprocess.run(
        ["skopeo", "copy", "-q", f"oci-archive:{archives['oci']}", storage],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    r = qemubox("image", "import", "app", f"oci-archive:{archives['oci']}")
    assert r.code == 0, r.err
    digest = r.out.split()[-1]
    made = json.loads(qemubox("image", "inspect", "app").out)
    unpacked = made["built"]
    for name, source in [
        ("app2", f"docker-archive:{archives['docker']}"),
        ("app3", f"oci:{archives['layout']}:1.2"),
        ("app4", storage),  # podman's and buildah's local images
    ]:
        r = qemubox("image", "import", name, source)
        assert (r.code, r.out.split()[-1]) == (0, digest), r.err
        again = json.loads(qemubox("image", "inspect", name).out)
        assert (again["base"], again["built"]) == (made["base"], unpacked)
    assert made["config"]["user"] == "app" and made["digest"] == digest
    listed = json.loads(qemubox("image", "ls", "--json").out)
    assert {i["name"] for i in listed if i["digest"] == digest} == {"app", "app2", "app3", "app4"}
    xattrs = subprocess.run(
        ["debugfs", "-R", "ea_list /data/new.txt", made["base"]],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    assert 'user.origin (6) = "layer2"' in xattrs
    r = qemubox("run", "--kernel", kernel, "--image", "app2", "--", "cat /data/kept.txt")
    assert (r.code, r.out) == (0, "kept\n"), r.err


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_named_sandbox_on_an_imported_image_keeps_its_root(kernel, archives, state):
    assert qemubox("image", "import", "app", f"oci-archive:{archives['oci']}").code == 0
    r = qemubox("create", "--kernel", kernel, "--image", "app", "box")
    assert r.code == 0, r.err
    r = qemubox("exec", "box", "--", "sh", "-c", "echo kept > /home/app/f; id -u; pwd")
    assert (r.code, r.out.split()) == (0, ["1000", "/work"]), r.err
    assert qemubox("stop", "box").code == 0
    assert qemubox("start", "box").code == 0
    r = qemubox("exec", "-u", "0", "box", "--", "sh", "-c", "cat /home/app/f; id -u")
    assert (r.code, r.out.split()) == (0, ["kept", "0"]), r.err
    r = qemubox("image", "rm", "app")
    assert r.code == 2 and "used by sandbox box" in r.err
    assert qemubox("rm", "-f", "box").code == 0
    assert qemubox("image", "rm", "app").code == 0


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_root_with_no_shell_and_no_libc_boots(kernel, state, tmp_path):
    layer = layer_tar([Entry("busybox", data=BUSYBOX.read_bytes(), mode=0o755)])
    config = {"Entrypoint": ["/busybox", "echo"], "Cmd": ["distroless"]}
    layout = oci_layout(tmp_path / "l", [layer], config, arches.host().oci_arch, "latest")
    image = f"oci-archive:{tar_dir(layout, tmp_path / 'd.tar')}"
    r = qemubox("run", "--kernel", kernel, "--image", image, "--net", "user")
    assert (r.code, r.out) == (0, "distroless\n"), r.err
    r = qemubox("run", "--kernel", kernel, "--image", image, "--", "sh")
    assert r.code == 0 and r.out == "sh\n"  # echo's argument: the root has no sh to run
    r = qemubox("run", "--kernel", kernel, "--image", image, "--entrypoint", "/bin/sh")
    assert r.code == 127 and "/bin/sh" in r.err


def _cache_entries() -> set[str]:
    """The unpacked images, and anything half-made, in the cache (not the empty lock files
    through which concurrent unpackers of one image wait for each other)."""
    from qemubox import paths

    root = paths.cache_dir() / "images" / "oci"
    names = set(os.listdir(root)) if root.is_dir() else set()
    return {n for n in names if not (n.startswith(".") and n.endswith(".lock"))}


@pytest.mark.kernel
@pytest.mark.qemu
def test_bad_images_are_one_line_exit_2_and_leave_nothing(kernel, archives, state, tmp_path):
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archives["oci"].read_bytes()[:5000])
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(os.urandom(20000))
    cases = [
        (f"oci-archive:{tmp_path}/missing.tar", "no such file"),
        (f"oci-archive:{truncated}", "image oci-archive:"),
        (f"docker-archive:{corrupt}", "image docker-archive:"),
        ("ftp:app.tar", "unknown transport 'ftp'"),
        (f"oci-archive:{archives['arm']}", "is for riscv64; this guest is"),
    ]
    before = _cache_entries()
    for source, words in cases:
        run = ["run", "--kernel", kernel, "--image", source, "--", "true"]
        for argv in (["image", "import", "bad", source], run):
            r = qemubox(*argv)
            assert r.code == 2, (argv, r.err)
            assert words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    # An archive replaced between planning and unpacking is refused, not booted as the image
    # that was planned.
    from qemubox.image import catalog

    def archive(name: str, salt: str) -> Path:  # an image never unpacked before
        config = {"Cmd": ["true"], "Env": [f"SALT={salt}"]}
        layout = oci_layout(tmp_path / name, app_layers(), config, arches.host().oci_arch, "1")
        return tar_dir(layout, tmp_path / f"{name}.tar")

    moving = archive("planned", os.urandom(8).hex())
    root = catalog.root_plan(f"oci-archive:{moving}", "disk", arches.host().debian_arch, "9p")
    archive("other", os.urandom(8).hex()).replace(moving)
    with pytest.raises(InputError, match="changed since it was planned: run again"):
        catalog.ensure_built(root, arches.host().name)
    assert _cache_entries() == before
    # No image was imported under the bad sources' name: the built-ins alone are listed.
    listed = [image["name"] for image in json.loads(qemubox("image", "ls", "--json").out)]
    assert listed == list(catalog.BUILTIN)


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_dockerfile_from_debian_builds_a_runnable_image(kernel, state, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "greeting.txt").write_text("copied\n")
    (ctx / "Dockerfile").write_text(
        "FROM debian\n"
        "ARG FLAVOUR=plain\n"
        "RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends jq "
        "&& rm -rf /var/lib/apt/lists/*\n"
        "ENV MODE=$FLAVOUR\n"
        "WORKDIR /srv/app\n"
        "COPY greeting.txt ./\n"
        "RUN useradd -m -u 1500 builder && chown builder greeting.txt\n"
        "USER builder\n"
        'CMD ["sh", "-c", "echo \\"{\\\\\\"mode\\\\\\": \\\\\\"$MODE\\\\\\"}\\" | jq -r .mode; '
        'cat greeting.txt; pwd; id -un; stat -c %U greeting.txt"]\n'
    )
    r = qemubox(
        "image", "build", "web", "-f", ctx / "Dockerfile", "--build-arg", "FLAVOUR=tasty", ctx,
        timeout=1500,
    )  # fmt: skip
    assert r.code == 0, r.err[-3000:]
    r = qemubox("run", "--kernel", kernel, "--image", "web")
    assert r.code == 0, r.err
    assert r.out.split() == ["tasty", "copied", "/srv/app", "builder", "builder"]
    out = tmp_path / "web.oci.tar"
    assert qemubox("image", "export", "web", "-o", out).code == 0
    r = qemubox("run", "--kernel", kernel, "--image", f"oci-archive:{out}", "--", "jq", "-n", "1+1")
    assert (r.code, r.out) == (0, "2\n"), r.err
    (ctx / "Dockerfile").write_text("FROM debian\nRUN exit 7\n")
    r = qemubox("image", "build", "broken", "-f", ctx / "Dockerfile", ctx, timeout=600)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "Dockerfile" in r.err and "exit status 7" in r.err
    (ctx / "Dockerfile").write_text("FROM alpine\n")
    r = qemubox("image", "build", "broken", "-f", ctx / "Dockerfile", ctx)
    assert r.code == 2 and "FROM alpine: not a qemubox image" in r.err
    names = [i["name"] for i in json.loads(qemubox("image", "ls", "--json").out)]
    assert "broken" not in names
    shutil.rmtree(ctx)


def test_a_user_travels_in_the_exec_frame_and_bad_ids_are_refused():
    from qemubox.guest import protocol as p

    plain = p.exec_request([b"id"], [], b"/", False)
    as_app = p.exec_request([b"id"], [], b"/", False, user=(1000, 1001, (1001, 10)))
    assert as_app[:4] == (p.EXEC_USER).to_bytes(4, "little") and plain[:4] == bytes(4)
    assert as_app[len(plain) :] == b"".join(
        n.to_bytes(4, "little") for n in (1000, 1001, 2, 1001, 10)
    )
    for bad in [(-1, 0, ()), (0, 1 << 32, ()), (0, 0, tuple(range(65)))]:
        with pytest.raises(ValueError):
            p.exec_request([b"id"], [], b"/", False, user=bad)


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_dockerfile_from_an_archive_in_its_context(kernel, archives, state, tmp_path):
    shutil.copy(archives["docker"], tmp_path / "base.tar")
    (tmp_path / "Dockerfile").write_text(
        "FROM docker-archive:base.tar\nUSER root\nRUN echo built > /built\nUSER app\n"
        'ENTRYPOINT ["/bin/cat"]\nCMD ["/built"]\n'
    )
    r = qemubox("image", "build", "derived", "-f", tmp_path / "Dockerfile")
    assert r.code == 0, r.err[-2000:]
    r = qemubox("run", "--kernel", kernel, "--image", "derived")
    assert (r.code, r.out) == (0, "built\n"), r.err
    r = qemubox("run", "--kernel", kernel, "--image", "derived", "--", "/etc/motd")
    assert (r.code, r.out) == (0, "two\n"), r.err


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_matrix_runs_its_cells_on_container_images(kernel, archives, state, tmp_path):
    shutil.copy(archives["oci"], tmp_path / "app.tar")
    assert qemubox("image", "import", "app", f"docker-archive:{archives['docker']}").code == 0
    (tmp_path / "m.toml").write_text(
        f'[[kernel]]\nname = "k"\npath = "{kernel}"\n'
        '[matrix]\nimage = ["oci-archive:app.tar", "app", "minimal"]\n'
        '[[test]]\nname = "motd"\ncommand = "cat /etc/motd 2>/dev/null || echo none"\n'
    )
    out = tmp_path / "out.json"
    r = qemubox("matrix", tmp_path / "m.toml", "--json", out, cwd=tmp_path / "..")
    assert r.code == 0, r.err
    cells = json.loads(out.read_text())
    found = {c["axes"]["image"]: c["stdout"] for c in cells}
    assert found == {"oci-archive:app.tar": "two\n", "app": "two\n", "minimal": "none\n"}
    (tmp_path / "m.toml").write_text(
        f'[[kernel]]\nname = "k"\npath = "{kernel}"\n'
        '[[test]]\nname = "t"\ncommand = "true"\nimage = "oci-archive:gone.tar"\n'
    )
    r = qemubox("matrix", tmp_path / "m.toml")
    assert r.code == 2 and "image: image 'oci-archive:gone.tar'" in r.err, r.err


def test_system_tools_are_found_off_an_ordinary_users_path(monkeypatch):
    from qemubox.apt import program

    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # Debian's default for users
    assert program("mkfs.ext4", "e2fsprogs") in ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")
    assert program("depmod", "kmod").endswith("sbin/depmod")
    with pytest.raises(
        InputError, match="nosuchtool not found: install it with 'apt-get install x'"
    ):
        program("nosuchtool", "x")
