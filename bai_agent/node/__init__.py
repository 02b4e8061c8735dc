"""The machine itself: its mounts, disks and kernels' scratch space."""
