"""The host side: batches, devices and meshes, mask evaluation, faithfulness, attribution and the search loop."""
