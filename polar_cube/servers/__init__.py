"""Local servers the project starts itself: SeaweedFS for S3 (`s3server`), xcube's viewer
(`viewer`; its branding and context map: `viewer_branding`), and the process bookkeeping
they share (`processes`). No Prefect."""
