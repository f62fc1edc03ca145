from setuptools import find_packages, setup

# fairseq is not listed: the working build is the `fairseq-fixed` distribution
# (see requirements/fairseq.txt), and naming `fairseq` here would make pip pull
# upstream 0.12.2, which does not run on Python 3.11.
setup(
    name="tiekd-fairseq",
    version="0.1.0",
    description="TIE-KD: top-1 information enhanced knowledge distillation for fairseq",
    packages=find_packages(include=["tiekd_fairseq", "tiekd_fairseq.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "numpy", "sacrebleu>=2.0", "sentencepiece"],
    entry_points={
        "console_scripts": [
            "tiekd-eval=tiekd_fairseq.evaluation:main",
            "tiekd-analyze=tiekd_fairseq.analysis:main",
            "tiekd-seqkd=tiekd_fairseq.seqkd:main",
            "tiekd-iterate=tiekd_fairseq.iterate:main",
            "tiekd-cache-teacher=tiekd_fairseq.teacher_cache:main",
            "tiekd-export-teacher=tiekd_fairseq.export_teacher:main",
            "tiekd-demo=tiekd_fairseq.demo:main",
        ]
    },
)
