"""What the tests share, imported by name (as torchtune's tests/common.py is): constants and data helpers
(common), running the workflow (workflow), and the real servers and clusters the tests start on loopback: an
S3-protocol server (s3), a git-lfs HTTP server (lfs_server), a single-node Slurm cluster (slurm_cluster), and a
stand-in container runtime (container_standin). conftest.py holds only fixtures."""
