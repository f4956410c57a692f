"""Local servers the project starts itself: SeaweedFS for S3 (`s3server`), xcube's viewer
(`viewer`), and the process bookkeeping they share (`processes`). No Prefect."""
