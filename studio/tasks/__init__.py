"""What each tab asks of the models: text to image, inpaint and sketch, Hires. fix, upscale. Requests are checked
and planned on the CPU; jobs then run stage by stage on the memory manager."""
