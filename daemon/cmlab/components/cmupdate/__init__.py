"""CONFIGURATION_MANAGER_UPDATE (CMUpdate): the prerequisite check and the installation."""
