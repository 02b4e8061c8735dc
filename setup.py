from setuptools import find_packages, setup

setup(
    name="bai-agent",
    version="0.1.0",
    description="Worker-node daemon of a Backend.AI-style compute cluster, on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests", "tests.*", "bench"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["bai_agent_plugin.py"]},
    install_requires=[
        "twisted[tls]>=23.10,<27",
        "txaioetcd>=18.10.2,<19",
        "klein>=23.5,<26",
        "psutil>=5.9,<8",
        "attrs>=23.1",
        "treq>=23.11,<27",
        "prometheus_client>=0.17,<1",
        "nvidia-ml-py>=12.535",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-twisted>=1.14,<2",
            "hypothesis>=6.80",
        ],
    },
    entry_points={
        "console_scripts": ["bai-agent-ctl = bai_agent.ctl:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
