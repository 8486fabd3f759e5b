"""Start the Visdom server on a machine without internet access.

    python visdom_server.py start --port=8097          # http://127.0.0.1:8097
    python visdom_server.py start --public             # listen on every interface (no password!)
    python visdom_server.py install_static             # only put the page's files in place

On its first start Visdom downloads its page's JavaScript, CSS and fonts from CDNs and exits
when that fails. Every one of those files is published on npm: this fetches the pinned
packages with `npm pack` (which checks each tarball against the registry's integrity hash),
copies the files to where Visdom looks, and marks the build as done so Visdom downloads
nothing. Dashboards are kept in visdom_data/ so they survive a restart.
"""
import os
import subprocess
import sys
import tarfile
import tempfile

import fire
import visdom

DASHBOARDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "visdom_data")
# target under visdom/static -> (npm package, path inside it), as visdom 0.2.4's server/build.py names them
BOOTSTRAP = "bootstrap@3.3.7"
GLYPHICONS = "glyphicons-halflings-regular"
STATIC_FILES = {
    "js/jquery.min.js": ("jquery@3.1.1", "dist/jquery.min.js"),
    "js/bootstrap.min.js": (BOOTSTRAP, "dist/js/bootstrap.min.js"),
    "js/react-react.min.js": ("react@16.2.0", "umd/react.production.min.js"),
    "js/react-dom.min.js": ("react-dom@16.2.0", "umd/react-dom.production.min.js"),
    "js/react-modal.min.js": ("react-modal@3.1.10", "dist/react-modal.min.js"),
    "js/plotly-plotly.min.js": ("plotly.js-dist-min@2.11.1", "plotly.min.js"),
    "js/sjcl.js": ("sjcl@1.0.7", "sjcl.js"),
    "js/layout-bin-packer.js.map": ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js.map"),
    "js/layout_bin_packer.js": ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js"),
    "js/d3.v3.min.js": ("d3@3.5.17", "d3.min.js"),
    "js/d3-selection-multi.v1.js": ("d3-selection-multi@1.0.1", "build/d3-selection-multi.js"),
    "js/saveSvgAsPng.js": ("save-svg-as-png@1.4.17", "lib/saveSvgAsPng.js"),
    "css/react-resizable-styles.css": ("react-resizable@1.4.6", "css/styles.css"),
    "css/react-grid-layout-styles.css": ("react-grid-layout@0.16.3", "css/styles.css"),
    "css/bootstrap.min.css": (BOOTSTRAP, "dist/css/bootstrap.min.css"),
    "fonts/classnames": ("classnames@2.2.5", "index.js"),
    **{f"fonts/{GLYPHICONS}.{ext}": (BOOTSTRAP, f"dist/fonts/{GLYPHICONS}.{ext}")
       for ext in ("eot", "woff2", "woff", "ttf")},
    f"fonts/{GLYPHICONS}.svg#glyphicons_halflingsregular": (BOOTSTRAP, f"dist/fonts/{GLYPHICONS}.svg"),
    **{f"js/mathjax/2.7.5/{path}": ("mathjax@2.7.5", path) for path in (
        "MathJax.js", "config/Safe.js", "config/TeX-AMS-MML_HTMLorMML.js", "extensions/Safe.js",
        "jax/output/SVG/jax.js", "jax/output/SVG/config.js", "jax/output/SVG/fonts/TeX/fontdata.js",
        "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js")},
}


def static_dir():
    return os.path.join(os.path.dirname(visdom.__file__), "static")


def missing_files():
    return {target: source for target, source in STATIC_FILES.items()
            if not os.path.isfile(os.path.join(static_dir(), target))}


def install_static():
    """Put every file Visdom's page needs into visdom/static from npm; a no-op when all are there."""
    missing = missing_files()
    packages = sorted({package for package, _ in missing.values()})
    if packages:
        print(f"fetching Visdom's page files from npm: {', '.join(packages)}")
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(["npm", "pack", "--silent", "--pack-destination", folder, *packages],
                           check=True, stdout=subprocess.DEVNULL)
            for target, (package, path) in missing.items():
                name, version = package.rsplit("@", 1)
                tarball = os.path.join(folder, f"{name.replace('/', '-')}-{version}.tgz")
                with tarfile.open(tarball) as archive:
                    data = archive.extractfile(f"package/{path}").read()
                destination = os.path.join(static_dir(), target)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                with open(destination, "wb") as file:
                    file.write(data)
    user_style = os.path.join(static_dir(), "..", "user", "style.css")  # the page asks for it: avoid a 404
    if not os.path.exists(user_style):
        os.makedirs(os.path.dirname(user_style), exist_ok=True)
        open(user_style, "w").close()
    with open(os.path.join(static_dir(), "version.built"), "w") as file:
        file.write(visdom.__version__)  # tells Visdom its page is built: it downloads nothing


def start(port=8097, public=False, env_path=DASHBOARDS):
    """Install the page's files if needed, then run the Visdom server (on 127.0.0.1 unless --public)."""
    install_static()
    os.makedirs(env_path, exist_ok=True)
    command = [sys.executable, "-m", "visdom.server", "-port", str(port), "-env_path", env_path + os.sep]
    if not public:
        command.append("-bind_local")
    print(f"Visdom: http://127.0.0.1:{port} (dashboards kept in {env_path})", flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    fire.Fire({"start": start, "install_static": install_static})
