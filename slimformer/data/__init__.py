"""Data: named text sources read from a data directory, tokenisation, calibration samples."""

from slimformer.data.sources import SOURCES_HELP, data_dir, load_text, tokenize
from slimformer.data.sampling import calibration_samples, cut_windows, sample_windows

__all__ = ["SOURCES_HELP", "calibration_samples", "cut_windows", "data_dir", "load_text", "sample_windows", "tokenize"]
from slimformer.data.glue import GLUE_TASKS, GlueExample, TaskInfo, glue_task, load_glue

__all__ += ["GLUE_TASKS", "GlueExample", "TaskInfo", "glue_task", "load_glue"]
from slimformer.data.tasks import TASKS, TASKS_HELP, LMExample, MCExample, PartialExample, load_task

__all__ += ["TASKS", "TASKS_HELP", "LMExample", "MCExample", "PartialExample", "load_task"]
from slimformer.data.instructions import (IGNORE, INSTRUCTION_SOURCES_HELP, InstructionExample, instruction_examples,
                                          tokenize_instructions)

__all__ += ["IGNORE", "INSTRUCTION_SOURCES_HELP", "InstructionExample", "instruction_examples", "tokenize_instructions"]
