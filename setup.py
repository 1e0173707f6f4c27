"""Installs the speechclas package, its console scripts and its DEEPaaS entry point."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="speechclas",
    version="0.1.0",
    description="Trainable speech keyword classifier served through DEEPaaS",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    author="speechclas developers",
    author_email="speechclas@example.org",
    url="https://github.com/speechclas/speechclas",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(exclude=["tests", "tests.*"]),
    include_package_data=True,
    package_data={"speechclas": ["web/*", "lexicon.tsv"]},
    install_requires=read_requirements("requirements.txt"),
    extras_require={
        "test": read_requirements("test-requirements.txt"),
        # MLflow tracking (MLFLOW_TRACKING_URI): the client only; `mlflow server` needs the full mlflow.
        "mlflow": ["mlflow-skinny>=3,<4"],
        # speechclas-detect --manifest --engine ray: Ray Data on a cluster (RAY_ADDRESS) or a local Ray.
        # Below 2.64: speechclas.manifest passes max_task_retries, which Ray 2.60 deprecates for 2.64.
        "ray": ["ray[data]>=2.40,<2.64"],
    },
    entry_points={
        "console_scripts": [
            "speechclas-train=speechclas.cli:train_main",
            "speechclas-prepare=speechclas.cli:prepare_main",
            "speechclas-predict=speechclas.cli:predict_main",
            "speechclas-detect=speechclas.cli:detect_main",
            "speechclas-web=speechclas.webserver:main",
            "speechclas-serve=speechclas.serve:main",
        ],
        "deepaas.v2.model": ["speechclas=speechclas.api"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Multimedia :: Sound/Audio :: Speech",
    ],
)
