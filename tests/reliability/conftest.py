"""The reliability tier reuses the integration tier's real S3 servers."""

from tests.integration.conftest import _moto_server, aws_env, moto_s3, rclone_s3  # noqa: F401
