"""The wire contract's commands, checked for typos and clashes."""

import re

from twisted.protocols import amp

from bai_agent.protocol import commands, errors

SNAKE_CASE = re.compile(rb"^[a-z][a-z0-9_]*$")


def all_commands():
    return commands.MANAGER_TO_AGENT + (commands.Event,)


def test_every_command_has_an_explicit_name_equal_to_its_class():
    for command in all_commands():
        assert "commandName" in vars(command), command
        assert command.commandName == command.__name__.encode(), command


def test_command_names_are_unique():
    names = [command.commandName for command in commands.MANAGER_TO_AGENT]
    assert len(names) == len(set(names))


def test_arguments_and_responses_are_snake_case_and_unique():
    for command in all_commands():
        for part in (command.arguments, command.response):
            names = [name for name, _ in part]
            assert len(names) == len(set(names)), command
            for name in names:
                assert SNAKE_CASE.match(name), (command, name)


def test_every_manager_command_declares_the_common_errors():
    for command in commands.MANAGER_TO_AGENT:
        for error in errors.COMMON_ERRORS:
            assert command.errors.get(error) == error.code, (command, error)


def test_error_codes_are_unique_and_upper_case():
    codes = [error.code for error in errors.ALL_ERRORS]
    assert len(codes) == len(set(codes))
    for code in codes:
        assert re.match(rb"^[A-Z_]+$", code)
        assert code not in (amp.UNKNOWN_ERROR_CODE, amp.UNHANDLED_ERROR_CODE)


def test_kernel_commands_answer_kernel_not_found():
    for command in commands.MANAGER_TO_AGENT:
        argument_names = [name for name, _ in command.arguments]
        if b"kernel_id" in argument_names and command is not commands.CreateKernel:
            assert errors.KernelNotFound in command.errors, command
