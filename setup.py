"""Ships the Hydra configs (conf/) inside the package as diffq_bench/conf/, so that a normal
(non-editable) install finds them; everything else is declared in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildWithConf(build_py):
    """build_py that also copies conf/**/*.yaml to <build>/diffq_bench/conf/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads conf/ from the checkout (diffq_bench.config.find_conf_dir)
        target = Path(self.build_lib) / "diffq_bench" / "conf"
        for src in sorted(CONF.rglob("*.yaml")):
            dst = target / src.relative_to(CONF)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildWithConf})
