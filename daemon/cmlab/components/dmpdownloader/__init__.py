"""SMS_DMP_DOWNLOADER: synchronization and the download of update packages (with SetupDL)."""
