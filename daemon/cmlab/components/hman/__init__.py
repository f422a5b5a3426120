"""SMS_HIERARCHY_MANAGER (HMAN): applicability, the CMUHandler, the Easy Setup Package,
post-installation and Recover Secondary Site."""
