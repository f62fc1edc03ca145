from setuptools import find_packages, setup

# fairseq is not listed: the working build is the `fairseq-fixed` distribution
# (see requirements/fairseq.txt), and naming `fairseq` here would make pip pull
# upstream 0.12.2, which does not run on Python 3.11.
setup(
    name="tiekd-fairseq",
    version="0.1.0",
    description="TIE-KD: top-1 information enhanced knowledge distillation for fairseq",
    packages=find_packages(include=["tiekd", "tiekd_fairseq", "tiekd_fairseq.*", "tiekd_cli"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "numpy", "sacrebleu>=2.0", "sentencepiece", "sacremoses"],
    entry_points={
        "console_scripts": [
            "tiekd-eval=tiekd_cli.eval:main",
            "tiekd-analyze=tiekd_cli.analyze:main",
            "tiekd-seqkd=tiekd_cli.seqkd:main",
            "tiekd-iterate=tiekd_cli.iterate:main",
            "tiekd-cache-teacher=tiekd_cli.cache_teacher:main",
            "tiekd-export-teacher=tiekd_cli.export_teacher:main",
        ]
    },
)
