"""Fast checks of the local S3 server's start-up that need no server."""

import pytest

from polar_cube.servers.s3server import S3ServerError, check_bucket_name, start_s3_server


@pytest.mark.parametrize("name", ["b", "Bucket", "my_bucket", "-bucket", "a..b", "10.0.0.1"])
def test_a_bad_bucket_name_is_refused_before_a_server_starts(tmp_path, name):
    with pytest.raises(S3ServerError, match=f"bucket name '{name}': S3 needs 3-63 lowercase"):
        start_s3_server(tmp_path / "state", bucket=name)
    assert not (tmp_path / "state").exists()  # nothing launched, nothing written


@pytest.mark.parametrize("name", ["polar-cube", "abc", "a.b-c.d", "x" * 63])
def test_good_bucket_names_pass(name):
    check_bucket_name(name)
